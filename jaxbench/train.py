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
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import compiled, runs
from .errors import DataError, JaxbenchError

OPTIMIZERS = ("adam", "amsgrad", "adamw")
SCHEDULERS = ("reduce_on_plateau", "cosine", "constant")
LOSSES = ("mse", "huber", "weighted")
WEIGHT_KEYS = ("energy", "forces", "stress", "virials")


class ConfigError(JaxbenchError, ValueError):
    """An invalid value in a model card's training block or in the arguments of `train`."""


class TrainingDivergedError(JaxbenchError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, message, step=None, run_dir=None):
        self.step, self.run_dir = step, run_dir
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Durations
# ---------------------------------------------------------------------------------------------
_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_duration(v) -> float | None:
    """'60m', '1.5h', '90s', '5 days', 3600 -> seconds; None / 'none' -> None."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        if v <= 0:
            raise ConfigError(f"a duration must be positive, got {v}")
        return float(v)
    s = str(v).strip().lower()
    if s in ("none", "inf", ""):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*?)s?", s)
    if not m or (m.group(2) and m.group(2) not in _UNITS):
        raise ConfigError(f"cannot read duration {v!r}: use e.g. 90s, 60m, 1.5h, 5 days")
    val = float(m.group(1)) * _UNITS.get(m.group(2) or "s", 1)
    if val <= 0:
        raise ConfigError(f"a duration must be positive, got {v!r}")
    return val


# ---------------------------------------------------------------------------------------------
# The training block
# ---------------------------------------------------------------------------------------------
def _num(block, key, default=None, *, positive=False, nonneg=False, where="training"):
    v = block.get(key, default)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{key}: expected a number, got {v!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}.{key}: must be finite, got {v}")
    if positive and v <= 0:
        raise ConfigError(f"{where}.{key}: must be > 0, got {v}")
    if nonneg and v < 0:
        raise ConfigError(f"{where}.{key}: must be >= 0, got {v}")
    return v


def _weights(raw, where) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping like {{energy: 1, forces: 10}}, got {raw!r}")
    unknown = set(raw) - set(WEIGHT_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown loss term(s) {sorted(unknown)}; known: {', '.join(WEIGHT_KEYS)}")
    w = {k: _num(raw, k, 0.0, nonneg=True, where=where) for k in WEIGHT_KEYS}
    if not any(v > 0 for v in w.values()):
        raise ConfigError(f"{where}: all loss weights are zero; nothing would be trained")
    return w


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    optimizer: str
    learning_rate: float
    weight_decay: float
    weight_decay_on: tuple | None  # glob patterns over parameter paths; None: every parameter
    batch_size: int
    valid_batch_size: int
    loss: str  # mse | huber
    huber_delta: float
    energy_per_atom: bool
    weights: dict
    clip_grad: float | None
    ema: bool
    ema_decay: float
    ema_use_num_updates: bool
    scheduler: dict
    swa: dict | None  # {learning_rate, weights, start_fraction}
    max_epochs: int | None
    patience: int | None
    min_lr: float | None
    max_wall: float | None

    @staticmethod
    def from_card(card: dict) -> "TrainingConfig":
        name = card.get("name", "?")
        t = card.get("training")
        if not isinstance(t, dict):
            raise ConfigError(f"model card '{name}' has no training block")
        where = f"model card '{name}': training"
        opt = str(t.get("optimizer", "adam")).lower()
        if opt not in OPTIMIZERS:
            raise ConfigError(f"{where}.optimizer: unknown optimizer {opt!r}; known: {', '.join(OPTIMIZERS)}")
        lr = _num(t, "learning_rate", None, positive=True, where=where)
        if lr is None:
            raise ConfigError(f"{where}.learning_rate is missing")
        wd = _num(t, "weight_decay", 0.0, nonneg=True, where=where)
        wd_on = t.get("weight_decay_on")
        if wd_on is not None:
            if isinstance(wd_on, str):
                wd_on = [wd_on]
            if not isinstance(wd_on, (list, tuple)) or not wd_on or not all(isinstance(x, str) and x for x in wd_on):
                raise ConfigError(f"{where}.weight_decay_on: expected a non-empty list of parameter-path patterns, got {wd_on!r}")
            wd_on = tuple(wd_on)
        bs = t.get("batch_size", 1)
        if not isinstance(bs, int) or bs < 1:
            raise ConfigError(f"{where}.batch_size: must be a positive integer, got {bs!r}")
        vbs = t.get("valid_batch_size", bs)
        if not isinstance(vbs, int) or vbs < 1:
            raise ConfigError(f"{where}.valid_batch_size: must be a positive integer, got {vbs!r}")
        loss = str(t.get("loss", "mse")).lower()
        if loss not in LOSSES:
            raise ConfigError(f"{where}.loss: unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        el = t.get("energy_loss", "per_atom" if loss == "weighted" else "total")
        if el not in ("per_atom", "total"):
            raise ConfigError(f"{where}.energy_loss: must be per_atom or total, got {el!r}")
        weights = _weights(t.get("loss_weights", {"energy": 1.0, "forces": 1.0}), f"{where}.loss_weights")
        clip = _num(t, "clip_grad", None, positive=True, where=where)
        ema_decay = _num(t, "ema_decay", None, where=where)
        ema = bool(t.get("ema", ema_decay is not None))
        if ema:
            ema_decay = 0.99 if ema_decay is None else ema_decay
            if not 0.0 < ema_decay < 1.0:
                raise ConfigError(f"{where}.ema_decay: must be in (0, 1), got {ema_decay}")
        sched = t.get("scheduler", {"name": "constant"})
        if isinstance(sched, str):
            sched = {"name": sched}
        sched = dict(sched)
        sname = str(sched.get("name", "constant")).lower()
        if sname not in SCHEDULERS:
            raise ConfigError(f"{where}.scheduler.name: unknown scheduler {sname!r}; known: {', '.join(SCHEDULERS)}")
        sw = f"{where}.scheduler"
        if sname == "reduce_on_plateau":
            factor = _num(sched, "factor", 0.8, positive=True, where=sw)
            if factor >= 1:
                raise ConfigError(f"{sw}.factor: must be in (0, 1), got {factor}")
            patience = sched.get("patience", 10)
            if not isinstance(patience, int) or patience < 0:
                raise ConfigError(f"{sw}.patience: must be a non-negative integer, got {patience!r}")
            sched = dict(name=sname, factor=factor, patience=patience, min_lr=_num(sched, "min_lr", 0.0, nonneg=True, where=sw),
                         threshold=_num(sched, "threshold", 1e-4, nonneg=True, where=sw),
                         # TorchMD-Net's lr_warmup_steps: lr x min(1, (step + 1) / warmup_steps) before the plateau logic
                         warmup_steps=_num(sched, "warmup_steps", 0.0, nonneg=True, where=sw))
        elif sname == "cosine":
            sched = dict(name=sname, warmup_epochs=_num(sched, "warmup_epochs", 0.0, nonneg=True, where=sw),
                         warmup_steps=_num(sched, "warmup_steps", 0.0, nonneg=True, where=sw),
                         min_lr=_num(sched, "min_lr", 0.0, nonneg=True, where=sw))
        else:
            sched = dict(name=sname)
        swa = None
        raw_swa = t.get("swa")
        if isinstance(raw_swa, dict) and raw_swa.get("enabled", True):
            ww = f"{where}.swa"
            swa = dict(
                learning_rate=_num(raw_swa, "learning_rate", lr, positive=True, where=ww),
                weights=_weights(raw_swa.get("loss_weights", t.get("loss_weights", {})), f"{ww}.loss_weights"),
                start_fraction=_num(raw_swa, "start_epoch_fraction", 0.75, positive=True, where=ww),
                use_average=raw_swa.get("use_average", False),
            )
            if not isinstance(swa["use_average"], bool):
                raise ConfigError(f"{ww}.use_average: must be true or false, got {swa['use_average']!r}")
            if swa["start_fraction"] > 1:
                raise ConfigError(f"{ww}.start_epoch_fraction: must be in (0, 1], got {swa['start_fraction']}")
        max_epochs = t.get("max_epochs")
        if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < 1):
            raise ConfigError(f"{where}.max_epochs: must be a positive integer, got {max_epochs!r}")
        es = t.get("early_stopping", {}) or {}
        patience = es.get("patience")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ConfigError(f"{where}.early_stopping.patience: must be a positive integer, got {patience!r}")
        min_lr = _num(es, "min_lr", None, nonneg=True, where=f"{where}.early_stopping")
        try:
            max_wall = parse_duration(es.get("max_wall"))
        except ConfigError as e:
            raise ConfigError(f"{where}.early_stopping.max_wall: {e}") from None
        return TrainingConfig(
            optimizer=opt, learning_rate=lr, weight_decay=wd, weight_decay_on=wd_on, batch_size=bs, valid_batch_size=vbs,
            loss="huber" if loss == "huber" else "mse", huber_delta=_num(t, "huber_delta", 0.01, positive=True, where=where),
            energy_per_atom=el == "per_atom", weights=weights, clip_grad=clip, ema=ema,
            ema_decay=float(ema_decay) if ema else 0.0, ema_use_num_updates=bool(t.get("ema_use_num_updates", True)),
            scheduler=sched, swa=swa, max_epochs=max_epochs, patience=patience, min_lr=min_lr, max_wall=max_wall,
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parameter_path(path) -> str:
    """'interaction_0/linear_0e' for the key path of a leaf; the flax collection ('params') is dropped."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if keys and keys[0] == "params":
        keys = keys[1:]
    return "/".join(keys)


def weight_decay_mask(params, patterns):
    """Pytree of bools like `params`: True where the leaf's `parameter_path` matches one of `patterns`
    (fnmatch globs; `*` also crosses '/'). None patterns: every leaf. A pattern that matches no leaf is
    a ConfigError naming it (a typo would otherwise silently switch weight decay off)."""
    from fnmatch import fnmatchcase

    if patterns is None:
        return jax.tree.map(lambda _: True, params)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [parameter_path(p) for p, _ in leaves]
    for pat in patterns:
        if not any(fnmatchcase(q, pat) for q in paths):
            raise ConfigError(f"training.weight_decay_on: pattern {pat!r} matches no parameter; parameter paths "
                              f"are like {', '.join(sorted(paths)[:6])}, ...")
    return jax.tree_util.tree_unflatten(treedef, [any(fnmatchcase(q, pat) for pat in patterns) for q in paths])


def make_optimizer(cfg: TrainingConfig):
    """optax transformation giving the update direction; the step applies -lr * direction."""
    import optax

    parts = []
    if cfg.clip_grad:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad))
    # mace-torch's parameter groups give weight_decay only to interaction `linear` weights and products;
    # the mask is a function of the parameter tree, so it is built when the optimizer state is.
    mask = None if cfg.weight_decay_on is None else (lambda p: weight_decay_mask(p, cfg.weight_decay_on))
    if cfg.optimizer in ("adam", "amsgrad") and cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))  # torch Adam(weight_decay): L2 on the gradient
    parts.append(optax.scale_by_amsgrad() if cfg.optimizer == "amsgrad" else optax.scale_by_adam())
    if cfg.optimizer == "adamw" and cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))  # decoupled
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def loss_sums(out: dict, graph, cfg: TrainingConfig) -> dict[str, jax.Array]:
    """Sums and counts of each loss term and of absolute errors over a padded batch (means = sum / count)."""
    dtype = out["energy"].dtype

    def pen(x):
        if cfg.loss == "huber":
            return jnp.where(jnp.abs(x) <= cfg.huber_delta, 0.5 * x**2, cfg.huber_delta * (jnp.abs(x) - 0.5 * cfg.huber_delta))
        return x**2

    n = jnp.maximum(graph.n_node, 1).astype(dtype)
    gm = (graph.graph_mask & graph.has_energy).astype(dtype)
    de = out["energy"] - graph.energy.astype(dtype)
    de_l = de / n if cfg.energy_per_atom else de
    fm = (graph.node_mask & graph.has_forces[graph.node_graph]).astype(dtype)
    df = out["forces"] - graph.forces.astype(dtype)
    s = {
        "energy": jnp.sum(gm * pen(de_l)), "n_energy": jnp.sum(gm),
        "forces": jnp.sum(fm[:, None] * pen(df)), "n_forces": 3 * jnp.sum(fm),
        "energy_abs": jnp.sum(gm * jnp.abs(de)), "energy_sq": jnp.sum(gm * de**2),
        "energy_atom_abs": jnp.sum(gm * jnp.abs(de / n)),
        "forces_abs": jnp.sum(fm[:, None] * jnp.abs(df)), "forces_sq": jnp.sum(fm[:, None] * df**2),
    }
    if "stress" in out:
        sm = (graph.graph_mask & graph.has_stress).astype(dtype)
        ds = out["stress"] - graph.stress.astype(dtype)
        dv = ds * (graph.volume.astype(dtype) / n)[:, None, None]
        s.update(stress=jnp.sum(sm[:, None, None] * pen(ds)), virials=jnp.sum(sm[:, None, None] * pen(dv)),
                 n_stress=9 * jnp.sum(sm), stress_abs=jnp.sum(sm[:, None, None] * jnp.abs(ds)))
    return s


def combine(sums: dict, weights: dict) -> dict:
    """Weighted loss and its terms from `loss_sums` (works on jax or host values)."""
    terms = {}
    for k in WEIGHT_KEYS:
        if k not in sums:
            continue
        cnt = sums["n_stress"] if k in ("stress", "virials") else sums[f"n_{k}"]
        terms[k] = sums[k] / jnp.maximum(cnt, 1)
    loss = sum(weights[k] * v for k, v in terms.items())
    return dict(loss=loss, **terms)


def _cast_graph(graph, dtype):
    f = lambda x: np.asarray(x, dtype=dtype)  # noqa: E731
    return graph.replace(positions=f(graph.positions), cell=f(graph.cell), shifts=f(graph.shifts),
                         energy=f(graph.energy), forces=f(graph.forces), stress=f(graph.stress))


def _add(acc: dict, sums: dict) -> dict:
    for k, v in sums.items():
        acc[k] = acc.get(k, 0.0) + float(v)
    return acc


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------
def _resolve_dtype(dtype):
    name = jnp.dtype(dtype).name
    if name not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("float64 training needs jax_enable_x64 (the CLI sets it for --dtype float64)")
    return name


def _load_split(name, split, n, data_dir):
    from . import data

    frames = data.load(name, split, data_dir=data_dir)
    if n is not None:
        if n < 1:
            raise ConfigError(f"n_{split} must be >= 1, got {n}")
        frames = frames[np.arange(min(n, len(frames)))]
    return frames


def _deep_update(base, over):
    from .potential import deep_update as du

    return du(base, over)


def _read_model(model) -> dict:
    """A card name, a card dict, or the path of a card file (.yaml / .json)."""
    from .potential import model_card

    if isinstance(model, (str, os.PathLike)) and str(model).endswith((".yaml", ".yml", ".json")):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"model card file {path} does not exist")
        if path.suffix == ".json":
            card = runs.read_json(path)
        else:
            from .cards import read_card

            card = read_card(path)
        if "name" not in card or "architecture" not in card or "hyperparameters" not in card:
            raise ConfigError(f"model card file {path}: needs name, architecture and hyperparameters")
        return model_card(card)
    return model_card(model)


_FN_CACHE: dict[str, tuple] = {}
compiled.register(_FN_CACHE.clear)


def _step_functions(pot, cfg: TrainingConfig, tx, compute_stress: bool, devices: int = 1):
    """Jitted (train_step, eval_sums) for this model, loss, optimizer and EMA; reused across `train` calls
    with the same settings (the key holds everything the closures read), so tests and sweeps compile once.

    With `devices` > 1 the step is data-parallel: the batch comes split on a leading axis
    (`FrameGraphs.sharded_batch`), each device takes the gradient of its part of the loss, normalised by
    the whole batch's counts (the loss is a weighted sum of per-term sums / counts, so the parts add up
    to the full batch's loss exactly), the gradients are summed across devices and every device applies
    the same update: the same optimisation as one device, up to summation order."""
    import json

    key = json.dumps(dict(
        architecture=pot.card["architecture"], hp=pot.card["hyperparameters"], stats=pot.statistics.to_json(),
        loss=cfg.loss, delta=cfg.huber_delta, per_atom=cfg.energy_per_atom, opt=cfg.optimizer, wd=cfg.weight_decay, wd_on=cfg.weight_decay_on,
        clip=cfg.clip_grad, ema=cfg.ema, ema_decay=cfg.ema_decay, ema_num=cfg.ema_use_num_updates, stress=compute_stress,
        devices=devices,
    ), sort_keys=True, default=str)
    if key in _FN_CACHE:
        return _FN_CACHE[key]
    ema_decay, use_num = cfg.ema_decay, cfg.ema_use_num_updates
    axis = "batch" if devices > 1 else None

    def total(x):
        return jax.lax.psum(x, axis) if axis else x

    def train_step(state, graph, lr, weights, n_updates):
        if axis:
            graph = jax.tree.map(lambda x: x[0], graph)  # this device's part: [1, ...] -> [...]

        def loss_fn(p):
            out_ = pot(p, graph, compute_stress)
            sums = loss_sums(out_, graph, cfg)
            counts = {k: jax.lax.stop_gradient(total(v)) for k, v in sums.items() if k.startswith("n_")}
            return combine(dict(sums, **counts), weights)["loss"], sums

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        loss, sums, grads = total(loss), jax.tree.map(total, sums), jax.tree.map(total, grads)
        direction, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), state["params"], direction)
        new = dict(params=params, opt_state=opt_state)
        if "ema_params" in state:
            d = jnp.minimum(ema_decay, (1.0 + n_updates) / (10.0 + n_updates)) if use_num else ema_decay
            new["ema_params"] = jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), state["ema_params"], params)
        return new, loss, sums

    step = train_step
    if axis:
        from jax.sharding import PartitionSpec as P

        from .devices import mesh

        step = jax.shard_map(train_step, mesh=mesh(devices, axis), in_specs=(P(), P(axis), P(), P(), P()), out_specs=(P(), P(), P()),
                             check_vma=False)
    fns = (jax.jit(step), jax.jit(lambda p, g: loss_sums(pot(p, g, compute_stress), g, cfg)), jax.jit(pot.module.init))
    if len(_FN_CACHE) > 8:
        _FN_CACHE.clear()
    _FN_CACHE[key] = fns
    return fns


@jax.jit
def _swa_mean(avg, params, n):
    return jax.tree.map(lambda a, p: (a + (p - a) / (n + 1)).astype(a.dtype), avg, params)


def swa_update(avg, params, n_averaged: int):
    """Equal-weight running mean after `n_averaged` earlier members (torch AveragedModel.update_parameters:
    the first member is copied, then avg + (p - avg) / (n + 1))."""
    if n_averaged == 0:
        return jax.tree.map(lambda p: p, params)
    return _swa_mean(avg, params, float(n_averaged))


def _init_params(pot, init_fn, key, graph, dtype):
    """`Potential.init` with a cached jitted `module.init` (same parameters; compiled once per model)."""
    from .graph import edge_vectors
    from .potential import cast_params

    vectors = edge_vectors(graph, pad_length=2 * pot.r_max).astype(dtype)
    params = init_fn(key, vectors, pot.species_index(graph.species), graph.senders, graph.receivers,
                     graph.edge_mask, graph.node_mask)
    return cast_params(params, dtype)


def default_out(card_name, dataset, seed) -> Path:
    return Path("runs") / f"{card_name}-{dataset}-s{seed}"


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def train(
    model=None,
    dataset: str | None = None,
    budget="60m",
    max_epochs: int | None = None,
    seed: int = 0,
    out=None,
    resume: bool = False,
    dtype="float32",
    *,
    n_train: int | None = None,
    n_val: int | None = None,
    train_split: str = "train",
    val_split: str = "val",
    training: dict | None = None,
    statistics=None,
    checkpoint_every: int | None = None,
    checkpoint_every_s: float | None = 600.0,
    progress: bool = True,
    data_dir=None,
    pause_after_checkpoint: float = 0.0,
    devices: int | None = None,
    swa_on_budget: bool = True,
) -> dict[str, Any]:
    """Train `model` (card name or card dict) on `dataset`; write the run directory `out` (see `jaxbench.runs`).

    `budget` (e.g. '60m', None for none) and `max_epochs` bound the run (either may be None; the card's
    max_epochs / early_stopping.max_wall apply when not given). `n_train` / `n_val` take the first
    frames of the splits (tests, budgets). `training` is merged over the card's training block.
    `checkpoint_every` (steps) / `checkpoint_every_s` (seconds) also write `last` inside an epoch.
    With `resume`, the run in `out` continues exactly where its last complete checkpoint left it
    (budget / max_epochs may be raised). `devices`: split every batch over this many local devices
    (data-parallel, same updates as one device up to summation order; default: all local devices, at
    most the batch size; on a CPU see `jaxbench.use_cpu_devices`). `swa_on_budget`: the second phase
    starts at the card's fraction of the budget too (default), or only at its fraction of max_epochs
    (False: the card's schedule, cut where the budget ends). Returns a summary dict (run_dir, step, epoch, stop_reason,
    best_metric, elapsed_s).
    """
    from . import data
    from .devices import count as device_count
    from .graph import build_graphs
    from .potential import Potential, model_card
    from .stats import DatasetStatistics, compute_statistics

    compiled.check()  # before this run compiles (see jaxbench.compiled)
    # ---- resolve everything that can fail, before compute ------------------------------------
    if resume:
        if out is None:
            raise ConfigError("resume needs the run directory (out / --out)")
        info = runs.read_run(out)
        card, stats, ds = info["card"], info["statistics"], info["dataset"]
        stored = info["config"]
        if model is not None and _read_model(model)["name"] != card["name"]:
            raise ConfigError(f"run {out} trains '{card['name']}', not '{_read_model(model)['name']}'")
        if dataset is not None and data.get(dataset).name != ds["name"]:
            raise ConfigError(f"run {out} trains on '{ds['name']}', not '{dataset}'")
        dataset, seed = ds["name"], ds["seed"]
        n_train, n_val = ds.get("n_train_requested"), ds.get("n_val_requested")
        train_split, val_split = ds["splits"]["train"], ds["splits"]["val"]
        dtype = stored.get("dtype", dtype)
        budget_s = parse_duration(budget) if budget is not None else stored.get("budget_s")
        max_epochs = max_epochs if max_epochs is not None else stored.get("max_epochs")
        checkpoint_every = checkpoint_every if checkpoint_every is not None else stored.get("checkpoint_every")
        swa_on_budget = bool(stored.get("swa_on_budget", swa_on_budget))
        if devices is None and stored.get("devices"):  # same data-parallel split as before, where possible
            devices = min(int(stored["devices"]), len(jax.local_devices()))
        cfg = TrainingConfig.from_card(card)
    else:
        if model is None or dataset is None:
            raise ConfigError("train needs a model card and a dataset")
        card = _read_model(model)
        if training:
            card["training"] = _deep_update(card.get("training", {}), training)
        card.pop("_path", None)
        cfg = TrainingConfig.from_card(card)
        spec = data.get(dataset)
        dataset = spec.name
        for sp in (train_split, val_split):
            if sp not in spec.splits:
                from .errors import UnknownNameError

                raise UnknownNameError(f"split of dataset '{spec.name}'", sp, spec.splits)
        budget_s = parse_duration(budget)
        out = Path(out) if out is not None else default_out(card["name"], dataset, seed)
        if (Path(out) / "checkpoints").exists() and any((Path(out) / "checkpoints").iterdir()):
            raise ConfigError(f"run directory {out} already holds checkpoints; pass resume (--resume) or another out")
        stats = statistics
    dtype = _resolve_dtype(dtype)
    if budget_s is None:
        budget_s = cfg.max_wall
    elif cfg.max_wall is not None:
        budget_s = min(budget_s, cfg.max_wall)
    if max_epochs is None:
        max_epochs = cfg.max_epochs
    if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < 1):
        raise ConfigError(f"max_epochs must be a positive integer, got {max_epochs!r}")
    if max_epochs is None and budget_s is None:
        raise ConfigError("the run is unbounded: give max_epochs or a budget (the card has neither)")
    if cfg.scheduler["name"] == "cosine" and max_epochs is None:
        raise ConfigError("the cosine schedule needs max_epochs")
    out = Path(out)

    # ---- data, statistics, model -----------------------------------------------------------
    r_max = float(card["hyperparameters"]["r_max"])
    train_frames = _load_split(dataset, train_split, n_train, data_dir)
    val_frames = _load_split(dataset, val_split, n_val, data_dir)
    if len(train_frames) < cfg.batch_size:
        raise DataError(f"dataset '{dataset}' split '{train_split}' has {len(train_frames)} frames, fewer than the "
                        f"batch size {cfg.batch_size} of model card '{card['name']}'")
    if train_frames.energy is None and train_frames.forces is None:
        raise DataError(f"dataset '{dataset}' split '{train_split}' has no energy or force labels")
    if stats is not None:
        stats = stats if isinstance(stats, DatasetStatistics) else DatasetStatistics.from_json(stats)
        pot = Potential.from_card(card, stats)
        pot.check_species(train_frames.numbers, where=f"dataset '{dataset}' split '{train_split}'")
    fg_train = build_graphs(train_frames, r_max)
    if stats is None:
        stats = compute_statistics(train_frames, r_max, graphs=fg_train)
        pot = Potential.from_card(card, stats)
    pot.check_species(val_frames.numbers, where=f"dataset '{dataset}' split '{val_split}'")
    fg_val = build_graphs(val_frames, r_max)
    has_stress = bool(train_frames.stress is not None and train_frames.has_stress.any())
    phase_weights = [cfg.weights] + ([cfg.swa["weights"]] if cfg.swa else [])
    compute_stress = has_stress and any(w["stress"] > 0 or w["virials"] > 0 for w in phase_weights)
    vbs = min(cfg.valid_batch_size, len(val_frames))
    bs = cfg.batch_size
    n_dev = device_count(devices, bs, ConfigError)
    steps_per_epoch = math.ceil(len(train_frames) / bs)
    swa_epoch = None
    if cfg.swa and max_epochs is not None:
        swa_epoch = max(1, int(max_epochs * cfg.swa["start_fraction"]))
    swa_time = cfg.swa["start_fraction"] * budget_s if (cfg.swa and budget_s is not None and swa_on_budget) else None

    # ---- run directory ------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    config = dict(dtype=dtype, budget_s=budget_s, max_epochs=max_epochs, checkpoint_every=checkpoint_every,
                  checkpoint_every_s=checkpoint_every_s, training=cfg.to_json(), compute_stress=compute_stress,
                  steps_per_epoch=steps_per_epoch, swa_start_epoch=swa_epoch, swa_start_s=swa_time, swa_on_budget=swa_on_budget,
                  devices=n_dev)
    if not resume:
        runs.write_json(out / "card.json", card)
        runs.write_json(out / "statistics.json", stats.to_json())
        runs.write_json(out / "dataset.json", dict(
            name=dataset, splits=dict(train=train_split, val=val_split), seed=seed, n_train=len(train_frames),
            n_val=len(val_frames), n_train_requested=n_train, n_val_requested=n_val))
    runs.write_json(out / "config.json", config)

    # ---- parameters, optimizer, state ---------------------------------------------------------
    jdtype = jnp.dtype(dtype)
    init_graph = _cast_graph(fg_train.batch(np.arange(bs), n_graph=bs), dtype)
    tx = make_optimizer(cfg)
    fns = _step_functions(pot, cfg, tx, compute_stress, n_dev)
    params = _init_params(pot, fns[2], jax.random.PRNGKey(seed), init_graph, jdtype)
    state = dict(params=params, opt_state=tx.init(params))
    if cfg.ema:
        state["ema_params"] = params
    if cfg.swa:
        state["swa_params"] = params  # placeholder until the first second-phase epoch (swa_count 0)
    host = dict(step=0, epoch=0, batch_in_epoch=0, phase=1, lr=cfg.learning_rate, swa_count=0,
                plateau=dict(best=None, bad_epochs=0), best_metric=None, best_epoch=None,
                epochs_since_best=0, elapsed_s=0.0, epoch_sums={}, epoch_time_s=0.0)
    if resume:
        path, meta = runs.find_checkpoint(out, ("last", "last.prev", "best", "best.prev"))
        try:
            state = runs.load_checkpoint(path, target=state)
        except runs.CheckpointError as e:  # decodes badly although its hash matched: try the others
            import warnings

            warnings.warn(str(e), stacklevel=2)
            order = [w for w in ("last", "last.prev", "best", "best.prev") if runs.checkpoint_dir(out, w) != path]
            path, meta = runs.find_checkpoint(out, order)
            state = runs.load_checkpoint(path, target=state)
        for k in host:
            if k in meta:
                host[k] = meta[k]
        runs.append_jsonl(out / "log.jsonl", dict(event="resume", checkpoint=path.name, step=host["step"],
                                                   epoch=host["epoch"], batch_in_epoch=host["batch_in_epoch"], time=time.time()))
    else:
        runs.append_jsonl(out / "log.jsonl", dict(event="start", model=card["name"], dataset=dataset, seed=seed,
                                                   n_train=len(train_frames), n_val=len(val_frames), dtype=dtype,
                                                   parameters=pot.num_parameters(params), time=time.time()))

    # ---- jitted step and evaluation -------------------------------------------------------------
    step_fn, eval_fn = fns[:2]
    use_swa_average = bool(cfg.swa and cfg.swa["use_average"])
    val_batches = [_cast_graph(fg_val.batch(np.arange(i, min(i + vbs, len(fg_val))), n_graph=vbs), dtype)
                   for i in range(0, len(fg_val), vbs)]

    def inference_params():
        """The weights validation, `best` and `last` stand for (runs.load_potential reads the same choice)."""
        if use_swa_average and host["swa_count"] > 0:
            return state["swa_params"]
        return state["ema_params"] if cfg.ema else state["params"]

    def validate(weights):
        p = inference_params()
        if n_dev > 1:  # the step leaves the weights replicated on every device; evaluate on one
            p = jax.device_put(p, jax.local_devices()[0])
        acc = {}
        for g in val_batches:
            _add(acc, jax.device_get(eval_fn(p, g)))
        c = {k: float(v) for k, v in combine(acc, weights).items()}
        ne, nf = max(acc["n_energy"], 1), max(acc["n_forces"], 1)
        c.update(energy_mae_meV=1000 * acc["energy_abs"] / ne, energy_mae_meV_atom=1000 * acc["energy_atom_abs"] / ne,
                 forces_mae_meV_A=1000 * acc["forces_abs"] / nf, forces_rmse_meV_A=1000 * math.sqrt(acc["forces_sq"] / nf))
        return c

    def lr_at(step):
        sc = cfg.scheduler
        if host["phase"] == 2:
            return cfg.swa["learning_rate"]
        if sc["name"] == "cosine":
            total = max_epochs * steps_per_epoch
            warm = sc["warmup_steps"] or sc["warmup_epochs"] * steps_per_epoch
            if step < warm:
                return cfg.learning_rate * (step + 1) / warm
            frac = min(1.0, (step - warm) / max(total - warm, 1))
            return sc["min_lr"] + 0.5 * (cfg.learning_rate - sc["min_lr"]) * (1 + math.cos(math.pi * frac))
        if sc.get("warmup_steps") and step < sc["warmup_steps"]:
            return host["lr"] * (step + 1) / sc["warmup_steps"]
        return host["lr"]

    def meta():
        return dict(host, ema=cfg.ema, swa_average=use_swa_average, dtype=dtype, rng=dict(seed=seed, epoch=host["epoch"]), model=card["name"],
                    dataset=dataset, time=time.time())

    def save(which):
        runs.save_checkpoint(out, which, jax.device_get(state), meta())

    # ---- the loop -------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    total_steps = max_epochs * steps_per_epoch if max_epochs is not None else None
    bar = tqdm(total=total_steps, initial=host["step"], disable=not progress, unit="step", dynamic_ncols=True,
               desc=f"{card['name']} {dataset}")
    t_start = time.perf_counter() - host["elapsed_s"]
    t_session, step0 = time.perf_counter(), host["step"]
    t_last_ckpt = time.perf_counter()
    stop_reason = None

    def elapsed():
        return time.perf_counter() - t_start

    pending = None  # (loss, sums, step, epoch, batch) of the last step dispatched, not yet checked

    def settle():
        """Check the last dispatched step's loss (NaN stops the run, naming that step) and add its sums
        to the epoch's; returns its loss (None if nothing was pending). Runs before anything is saved."""
        nonlocal pending
        if pending is None:
            return None
        loss_d, sums_d, step_k, epoch_k, batch_k = pending
        pending = None
        loss = float(loss_d)
        if not math.isfinite(loss):
            runs.append_jsonl(out / "log.jsonl", dict(event="nan", step=step_k, epoch=epoch_k, batch=batch_k, loss=str(loss),
                                                       time=time.time()))
            raise TrainingDivergedError(
                f"loss is {loss} at step {step_k} (epoch {epoch_k}, batch {batch_k}); stopped. "
                f"The last good checkpoint in {out / 'checkpoints'} is kept.", step=step_k, run_dir=str(out))
        host["epoch_sums"] = _add(dict(host["epoch_sums"]), jax.device_get(sums_d))
        return loss

    def maybe_enter_phase2():
        if not cfg.swa or host["phase"] == 2:
            return False
        if (swa_epoch is not None and host["epoch"] >= swa_epoch) or (swa_time is not None and elapsed() >= swa_time):
            host.update(phase=2, lr=cfg.swa["learning_rate"], plateau=dict(best=None, bad_epochs=0),
                        best_metric=None, epochs_since_best=0)
            runs.append_jsonl(out / "log.jsonl", dict(event="phase2", epoch=host["epoch"], step=host["step"],
                                                       lr=host["lr"], weights=cfg.swa["weights"], time=time.time()))
            return True
        return False

    try:
        while stop_reason is None:
            if max_epochs is not None and host["epoch"] >= max_epochs:
                stop_reason = "max_epochs"
                break
            maybe_enter_phase2()
            weights = phase_weights[host["phase"] - 1]
            order = runs.epoch_order(len(fg_train), seed, host["epoch"])
            t_epoch = time.perf_counter() - host["epoch_time_s"]
            for b in range(host["batch_in_epoch"], steps_per_epoch):
                idx = order[b * bs : (b + 1) * bs]
                if n_dev > 1:
                    graph = _cast_graph(fg_train.sharded_batch(idx, n_dev, n_graph=bs), dtype)
                else:
                    graph = _cast_graph(fg_train.batch(idx, n_graph=bs), dtype)
                lr = lr_at(host["step"])
                # the SWA average is not an input of the step (it changes once per epoch, on the host side)
                trained = {k: v for k, v in state.items() if k != "swa_params"}
                new_state, loss, sums = step_fn(trained, graph, lr, weights, float(host["step"] + 1))
                # the previous step's loss is read while this one runs: no host round trip between steps
                last_loss = settle()
                pending = (loss, sums, host["step"] + 1, host["epoch"], b)
                state = dict(state, **new_state)
                host["step"] += 1
                host["batch_in_epoch"] = b + 1
                host["lr"] = lr if cfg.scheduler["name"] == "cosine" else host["lr"]
                host["elapsed_s"] = elapsed()
                host["epoch_time_s"] = time.perf_counter() - t_epoch
                bar.update(1)
                if budget_s is not None:
                    # the budget, not max_epochs, ends this run: size the bar (and its ETA) by it
                    rate = (host["step"] - step0) / max(time.perf_counter() - t_session, 1e-9)
                    est = host["step"] + int(rate * max(budget_s - elapsed(), 0.0))
                    bar.total = min(est, total_steps) if total_steps else est
                post = dict(ep=host["epoch"], loss="-" if last_loss is None else f"{last_loss:.4g}", lr=f"{lr:.2e}", ph=host["phase"])
                if budget_s is not None:
                    post["left"] = f"{max(budget_s - elapsed(), 0) / 60:.1f}m"
                bar.set_postfix(post, refresh=False)
                if budget_s is not None and elapsed() >= budget_s:
                    stop_reason = "budget"
                    break
                if b + 1 < steps_per_epoch and (
                    (checkpoint_every and host["step"] % checkpoint_every == 0)
                    or (checkpoint_every_s and time.perf_counter() - t_last_ckpt >= checkpoint_every_s)
                ):
                    settle()
                    save("last")
                    t_last_ckpt = time.perf_counter()
                    if pause_after_checkpoint:
                        time.sleep(pause_after_checkpoint)
            settle()
            if stop_reason == "budget" and host["batch_in_epoch"] < steps_per_epoch:
                # partial epoch: keep the position so that a resume with a larger budget continues it
                val = validate(weights)
                improved = host["best_metric"] is None or val["loss"] < host["best_metric"]
                runs.append_jsonl(out / "log.jsonl", dict(event="budget", epoch=host["epoch"], step=host["step"],
                                                           batch_in_epoch=host["batch_in_epoch"], val=val, best=improved,
                                                           elapsed_s=elapsed(), time=time.time()))
                if improved:
                    host.update(best_metric=val["loss"], best_epoch=host["epoch"])
                    save("best")
                save("last")
                break
            # ---- end of epoch: average, validate, schedule, log, checkpoint -------------------------
            if host["phase"] == 2:
                state = dict(state, swa_params=swa_update(state["swa_params"], state["params"], host["swa_count"]))
                host["swa_count"] += 1
            val = validate(weights)
            tr = {k: float(v) for k, v in combine(host["epoch_sums"], weights).items()}
            improved = host["best_metric"] is None or val["loss"] < host["best_metric"]
            if improved:
                host.update(best_metric=val["loss"], best_epoch=host["epoch"], epochs_since_best=0)
            else:
                host["epochs_since_best"] += 1
            sc = cfg.scheduler
            if host["phase"] == 1 and sc["name"] == "reduce_on_plateau":
                pl = host["plateau"]
                if pl["best"] is None or val["loss"] < pl["best"] * (1 - sc["threshold"]):
                    pl.update(best=val["loss"], bad_epochs=0)
                else:
                    pl["bad_epochs"] += 1
                    if pl["bad_epochs"] > sc["patience"]:
                        host["lr"] = max(host["lr"] * sc["factor"], sc["min_lr"])
                        pl["bad_epochs"] = 0
            runs.append_jsonl(out / "log.jsonl", dict(
                event="epoch", epoch=host["epoch"], step=host["step"], phase=host["phase"], lr=lr_at(host["step"]),
                train=tr, val=val, best=improved, epoch_time_s=time.perf_counter() - t_epoch, elapsed_s=elapsed(),
                time=time.time()))
            if progress:
                bar.write(f"epoch {host['epoch']}: train loss {tr['loss']:.4g}  val loss {val['loss']:.4g}  "
                          f"E MAE {val['energy_mae_meV']:.2f} meV  F MAE {val['forces_mae_meV_A']:.2f} meV/Å  lr {lr_at(host['step']):.2e}")
            host.update(epoch=host["epoch"] + 1, batch_in_epoch=0, epoch_sums={}, epoch_time_s=0.0, elapsed_s=elapsed())
            if improved:
                save("best")
            save("last")
            t_last_ckpt = time.perf_counter()
            if stop_reason is None:
                if cfg.patience is not None and host["epochs_since_best"] >= cfg.patience:
                    stop_reason = "patience"
                elif cfg.min_lr is not None and lr_at(host["step"]) < cfg.min_lr:
                    stop_reason = "min_lr"
                elif budget_s is not None and elapsed() >= budget_s:
                    stop_reason = "budget"
    finally:
        bar.close()
    summary = dict(run_dir=str(out), step=host["step"], epoch=host["epoch"], batch_in_epoch=host["batch_in_epoch"],
                   stop_reason=stop_reason, best_metric=host["best_metric"], best_epoch=host["best_epoch"],
                   elapsed_s=elapsed(), phase=host["phase"], lr=lr_at(host["step"]), swa_count=host["swa_count"])
    runs.append_jsonl(out / "log.jsonl", dict(event="stop", **summary, time=time.time()))
    return summary
