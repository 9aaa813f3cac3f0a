"""Training: the papers' protocols from the model card's `training` block, resumable and logged.

    train(model="mace", dataset="md17-ethanol", budget="60m", seed=0, out="runs/mace-ethanol")
    jaxbench train --model mace --dataset md17-ethanol --budget 60m --out runs/mace-ethanol [--resume]

The `training` block of a card (see `TrainingConfig.from_card`; every key is validated before anything
is computed):

    optimizer        adam | amsgrad | adamw              weight_decay  L2 (adam/amsgrad, as torch) or decoupled (adamw)
    weight_decay_on  [glob patterns over parameter paths, e.g. "interaction_*/linear_[0-9]*", "product_*"]:
                     decay only the leaves whose path (flax collection dropped, "/"-joined) matches one of
                     them (mace-torch decays interaction `linear` weights and products only); absent: all
    learning_rate    > 0                                 clip_grad     global-norm clip (null: none)
    batch_size, valid_batch_size
    loss             mse | huber | weighted (= mse, energy per atom, as mace-torch)   huber_delta
    energy_loss      per_atom | total (default: per_atom for `loss: weighted`, else total)
    loss_weights     {energy, forces, stress, virials}   (virials = stress * volume / atoms, as mace-torch)
    ema / ema_decay / ema_use_num_updates               (EMA on when ema_decay is given, unless ema: false)
    scheduler        {name: reduce_on_plateau, factor, patience, min_lr, threshold, warmup_steps}
                   | {name: cosine, warmup_epochs | warmup_steps, min_lr} | {name: constant}
    swa              {enabled, learning_rate, loss_weights, start_epoch_fraction, use_average}: second phase with
                     new loss weights and a constant lr (mace-torch "stage two"); starts at the fraction of
                     max_epochs, or of the wall-clock budget when one is given, whichever comes first.
                     Through it an equal-weight average of the weights after every second-phase epoch is kept
                     (torch.optim.swa_utils.AveragedModel arithmetic; `swa_params` in the checkpoint). With
                     use_average: true it is what validation, `best` and `last` (load_potential) use; false
                     (default) keeps it aside, as mace-torch 0.3 does: its AveragedModel is updated but its
                     validation and saved models are the live weights under EMA (tools/train.py, run_train.py)
    max_epochs
    early_stopping   {patience (epochs without a better validation metric), min_lr, max_wall (e.g. "5 days")}

The validation metric (best checkpoint, plateau, patience) is the validation loss under the current
phase's weights (as nequip and mace-torch); it restarts when the second phase begins.
The learning rate is host-side state passed to the jitted step, so schedules never recompile.

The package is split by what changes together: ``config`` (cards -> a frozen, validated
:class:`TrainingConfig`; durations), ``step`` (optimiser, losses, the jitted and data-parallel step,
SWA averaging; no IO), ``setup`` (the run plan, data, statistics and Potential, the run directory's
description) and ``loop`` (epochs, schedules, validation, early stopping, budget, checkpoints, and
:func:`train`). Everything public is re-exported here.
"""

from __future__ import annotations

from .config import (
    LOSSES,
    OPTIMIZERS,
    SCHEDULERS,
    WEIGHT_KEYS,
    ConfigError,
    TrainingConfig,
    TrainingDivergedError,
    parse_duration,
)
from .loop import Loop, train
from .setup import RunPlan, default_out, plan_run, prepare
from .step import (
    add_sums,
    cast_graph,
    combine,
    init_params,
    loss_sums,
    make_optimizer,
    parameter_path,
    step_functions,
    swa_update,
    weight_decay_mask,
)

__all__ = [
    "train", "TrainingConfig", "ConfigError", "TrainingDivergedError", "parse_duration", "make_optimizer",
    "parameter_path", "weight_decay_mask", "loss_sums", "combine", "swa_update", "step_functions", "init_params",
    "cast_graph", "add_sums", "default_out", "plan_run", "prepare", "RunPlan", "Loop",
    "OPTIMIZERS", "SCHEDULERS", "LOSSES", "WEIGHT_KEYS",
]
