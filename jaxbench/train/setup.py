"""Everything `train` decides before it computes: the run (new or resumed), its data and its potential.

    plan = plan_run(...)            card, config, dataset, splits, bounds, run directory (all checks here)
    prep = prepare(plan, ...)       frames, statistics, Potential, graphs, batch sizes, devices, SWA start
    write_run_files(plan, prep)     card.json, statistics.json, dataset.json, config.json (jaxbench.runs layout)
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import runs
from ..errors import DataError
from .config import ConfigError, TrainingConfig, parse_duration


def resolve_dtype(dtype):
    name = jnp.dtype(dtype).name
    if name not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("float64 training needs jax_enable_x64 (the CLI sets it for --dtype float64)")
    return name


def load_split(name, split, n, data_dir):
    """The frames of a split, the first `n` of them when `n` is given."""
    from .. import data

    frames = data.load(name, split, data_dir=data_dir)
    if n is not None:
        if n < 1:
            raise ConfigError(f"n_{split} must be >= 1, got {n}")
        frames = frames[np.arange(min(n, len(frames)))]
    return frames


def read_model(model) -> dict:
    """A card name, a card dict, or the path of a card file (.yaml / .json)."""
    from ..potential import model_card

    if isinstance(model, (str, os.PathLike)) and str(model).endswith((".yaml", ".yml", ".json")):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"model card file {path} does not exist")
        if path.suffix == ".json":
            card = runs.read_json(path)
        else:
            from ..cards import read_card

            card = read_card(path)
        if "name" not in card or "architecture" not in card or "hyperparameters" not in card:
            raise ConfigError(f"model card file {path}: needs name, architecture and hyperparameters")
        return model_card(card)
    return model_card(model)


def default_out(card_name, dataset, seed) -> Path:
    return Path("runs") / f"{card_name}-{dataset}-s{seed}"


@dataclasses.dataclass
class RunPlan:
    """What to train, on what, for how long, where."""

    card: dict
    cfg: TrainingConfig
    stats: Any  # DatasetStatistics, its JSON, or None (computed on the training split)
    dataset: str
    seed: int
    n_train: int | None
    n_val: int | None
    train_split: str
    val_split: str
    dtype: str
    budget_s: float | None
    max_epochs: int | None
    checkpoint_every: int | None
    swa_on_budget: bool
    devices: int | None
    out: Path
    resume: bool


def _plan_resume(model, dataset, budget, max_epochs, out, dtype, checkpoint_every, swa_on_budget, devices, data_dir):
    """The run in `out` as it was started, with the bounds that may be raised now."""
    from .. import data

    if out is None:
        raise ConfigError("resume needs the run directory (out / --out)")
    info = runs.read_run(out)
    card, stats, ds = info["card"], info["statistics"], info["dataset"]
    stored = info["config"]
    if model is not None and read_model(model)["name"] != card["name"]:
        raise ConfigError(f"run {out} trains '{card['name']}', not '{read_model(model)['name']}'")
    if dataset is not None and data.get(dataset, data_dir).name != ds["name"]:
        raise ConfigError(f"run {out} trains on '{ds['name']}', not '{dataset}'")
    if devices is None and stored.get("devices"):  # same data-parallel split as before, where possible
        devices = min(int(stored["devices"]), len(jax.local_devices()))
    return RunPlan(
        card=card, cfg=TrainingConfig.from_card(card), stats=stats, dataset=ds["name"], seed=ds["seed"],
        n_train=ds.get("n_train_requested"), n_val=ds.get("n_val_requested"),
        train_split=ds["splits"]["train"], val_split=ds["splits"]["val"], dtype=stored.get("dtype", dtype),
        budget_s=parse_duration(budget) if budget is not None else stored.get("budget_s"),
        max_epochs=max_epochs if max_epochs is not None else stored.get("max_epochs"),
        checkpoint_every=checkpoint_every if checkpoint_every is not None else stored.get("checkpoint_every"),
        swa_on_budget=bool(stored.get("swa_on_budget", swa_on_budget)), devices=devices, out=Path(out), resume=True)


def _plan_new(model, dataset, budget, max_epochs, seed, out, dtype, n_train, n_val, train_split, val_split, training,
              statistics, checkpoint_every, swa_on_budget, devices, data_dir):
    from .. import data
    from ..potential import deep_update

    if model is None or dataset is None:
        raise ConfigError("train needs a model card and a dataset")
    card = read_model(model)
    if training:
        card["training"] = deep_update(card.get("training", {}), training)
    cfg = TrainingConfig.from_card(card)  # before dropping `_path`, so that its errors name the card file
    card.pop("_path", None)
    spec = data.get(dataset, data_dir)
    for sp in (train_split, val_split):
        if sp not in spec.splits:
            from ..errors import UnknownNameError

            raise UnknownNameError(f"split of dataset '{spec.name}'", sp, spec.splits)
    out = Path(out) if out is not None else default_out(card["name"], spec.name, seed)
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise ConfigError(f"run directory {out} already holds checkpoints; pass resume (--resume) or another out")
    return RunPlan(card=card, cfg=cfg, stats=statistics, dataset=spec.name, seed=seed, n_train=n_train, n_val=n_val,
                   train_split=train_split, val_split=val_split, dtype=dtype, budget_s=parse_duration(budget),
                   max_epochs=max_epochs, checkpoint_every=checkpoint_every, swa_on_budget=swa_on_budget,
                   devices=devices, out=out, resume=False)


def plan_run(model, dataset, budget, max_epochs, seed, out, resume, dtype, *, n_train, n_val, train_split, val_split,
             training, statistics, checkpoint_every, swa_on_budget, devices, data_dir=None) -> RunPlan:
    """Resolve and check everything that can fail before compute: a new run, or the one in `out` (resume).
    `data_dir`: where the dataset's cards and files are (generated datasets' cards live there)."""
    if resume:
        plan = _plan_resume(model, dataset, budget, max_epochs, out, dtype, checkpoint_every, swa_on_budget, devices,
                            data_dir)
    else:
        plan = _plan_new(model, dataset, budget, max_epochs, seed, out, dtype, n_train, n_val, train_split, val_split,
                         training, statistics, checkpoint_every, swa_on_budget, devices, data_dir)
    cfg = plan.cfg
    plan.dtype = resolve_dtype(plan.dtype)
    if plan.budget_s is None:
        plan.budget_s = cfg.max_wall
    elif cfg.max_wall is not None:
        plan.budget_s = min(plan.budget_s, cfg.max_wall)
    if plan.max_epochs is None:
        plan.max_epochs = cfg.max_epochs
    if plan.max_epochs is not None and (not isinstance(plan.max_epochs, int) or plan.max_epochs < 1):
        raise ConfigError(f"max_epochs must be a positive integer, got {plan.max_epochs!r}")
    if plan.max_epochs is None and plan.budget_s is None:
        raise ConfigError("the run is unbounded: give max_epochs or a budget (the card has neither)")
    if cfg.scheduler["name"] == "cosine" and plan.max_epochs is None:
        raise ConfigError("the cosine schedule needs max_epochs")
    return plan


@dataclasses.dataclass
class Prepared:
    """The run's data and model, and the shapes of its epochs."""

    train_frames: Any
    val_frames: Any
    stats: Any  # DatasetStatistics
    pot: Any  # Potential
    fg_train: Any  # FrameGraphs
    fg_val: Any
    phase_weights: list  # loss weights of phase 1 (and 2: SWA)
    compute_stress: bool
    batch_size: int
    valid_batch_size: int
    n_dev: int
    steps_per_epoch: int
    swa_epoch: int | None  # second phase starts at this epoch ...
    swa_time: float | None  # ... or after this many seconds, whichever comes first


def prepare(plan: RunPlan, data_dir) -> Prepared:
    """Frames of both splits, dataset statistics (training split only), the Potential and the graphs."""
    from ..devices import count as device_count
    from ..graph import build_graphs
    from ..potential import Potential
    from ..stats import DatasetStatistics, compute_statistics

    cfg, card, dataset = plan.cfg, plan.card, plan.dataset
    r_max = float(card["hyperparameters"]["r_max"])
    train_frames = load_split(dataset, plan.train_split, plan.n_train, data_dir)
    val_frames = load_split(dataset, plan.val_split, plan.n_val, data_dir)
    if len(train_frames) < cfg.batch_size:
        raise DataError(f"dataset '{dataset}' split '{plan.train_split}' has {len(train_frames)} frames, fewer than the "
                        f"batch size {cfg.batch_size} of model card '{card['name']}'")
    if train_frames.energy is None and train_frames.forces is None:
        raise DataError(f"dataset '{dataset}' split '{plan.train_split}' has no energy or force labels")
    stats = plan.stats
    if stats is not None:
        stats = stats if isinstance(stats, DatasetStatistics) else DatasetStatistics.from_json(stats)
        pot = Potential.from_card(card, stats)
        pot.check_species(train_frames.numbers, where=f"dataset '{dataset}' split '{plan.train_split}'")
    fg_train = build_graphs(train_frames, r_max)
    if stats is None:
        stats = compute_statistics(train_frames, r_max, graphs=fg_train)
        pot = Potential.from_card(card, stats)
    pot.check_species(val_frames.numbers, where=f"dataset '{dataset}' split '{plan.val_split}'")
    fg_val = build_graphs(val_frames, r_max)
    has_stress = bool(train_frames.stress is not None and train_frames.has_stress.any())
    phase_weights = [cfg.weights] + ([cfg.swa["weights"]] if cfg.swa else [])
    compute_stress = has_stress and any(w["stress"] > 0 or w["virials"] > 0 for w in phase_weights)
    bs = cfg.batch_size
    swa_epoch = max(1, int(plan.max_epochs * cfg.swa["start_fraction"])) if cfg.swa and plan.max_epochs is not None \
        else None
    swa_time = cfg.swa["start_fraction"] * plan.budget_s if (cfg.swa and plan.budget_s is not None and plan.swa_on_budget) \
        else None
    return Prepared(train_frames, val_frames, stats, pot, fg_train, fg_val, phase_weights, compute_stress, bs,
                    min(cfg.valid_batch_size, len(val_frames)), device_count(plan.devices, bs, ConfigError),
                    math.ceil(len(train_frames) / bs), swa_epoch, swa_time)


def write_run_files(plan: RunPlan, prep: Prepared, checkpoint_every_s) -> None:
    """The run directory's description (a resumed run keeps its card, statistics and dataset files)."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    config = dict(dtype=plan.dtype, budget_s=plan.budget_s, max_epochs=plan.max_epochs,
                  checkpoint_every=plan.checkpoint_every, checkpoint_every_s=checkpoint_every_s,
                  training=plan.cfg.to_json(), compute_stress=prep.compute_stress, steps_per_epoch=prep.steps_per_epoch,
                  swa_start_epoch=prep.swa_epoch, swa_start_s=prep.swa_time, swa_on_budget=plan.swa_on_budget,
                  devices=prep.n_dev)
    if not plan.resume:
        runs.write_json(out / "card.json", plan.card)
        runs.write_json(out / "statistics.json", prep.stats.to_json())
        runs.write_json(out / "dataset.json", dict(
            name=plan.dataset, splits=dict(train=plan.train_split, val=plan.val_split), seed=plan.seed,
            n_train=len(prep.train_frames), n_val=len(prep.val_frames), n_train_requested=plan.n_train,
            n_val_requested=plan.n_val))
    runs.write_json(out / "config.json", config)
