"""Run directories: what `jaxbench train` writes and what the simulator, evaluator and ASE calculator read.

Layout of a run directory::

    RUN/
      card.json            the full model card the run was trained with (hyperparameters + training block)
      statistics.json      `DatasetStatistics` of the training split (E0, shift, scale, avg neighbours, cutoff)
      dataset.json         {"name", "splits": {"train", "val"}, "n_train", "n_val", "seed"}
      config.json          the arguments of `train` (budget, max_epochs, dtype, checkpoint cadence, ...)
      log.jsonl            one JSON object per epoch (losses, val MAEs, lr, phase, wall time), plus events
      checkpoints/
        last/              newest checkpoint (end of each epoch and every N steps inside an epoch)
        last.prev/         the one before it (kept as a fallback)
        best/              best validation metric so far
        best.prev/
      results*.json, parity*.png   written by `jaxbench evaluate`

A checkpoint directory holds

    state.msgpack   flax.serialization msgpack of {"params", "ema_params" (when EMA is on), "swa_params" (when
                    the card has a second (SWA) phase: the running mean of the weights), "opt_state"}
    meta.json       {"format": 1, "step", "epoch", "batch_in_epoch", "phase", "lr", "plateau", "best_metric",
                     "rng": {"seed", "epoch"}, "ema": bool, "swa_average": bool, "swa_count": int, "dtype",
                     "elapsed_s", "sha256": <of state.msgpack>, ...}

The parameters a checkpoint stands for (`load_potential`): `swa_params` when `swa_average` is true and
`swa_count` > 0, else `ema_params` when `ema` is true, else `params`.

`meta.json` is written last and records the sha256 of `state.msgpack`: a checkpoint without it, or whose
hash does not match, is partial or corrupt. Writes are atomic: the new checkpoint is written into a
temporary sibling directory, files and directory are fsynced, the current one is renamed to `<name>.prev`
and the temporary one renamed into place. A crash at any moment therefore leaves at least one complete
checkpoint (`<name>` or `<name>.prev`); a corrupt `<name>` is moved aside to `<name>.corrupt-N` and never
rotated over the good `.prev`.

Shuffling is a pure function of (seed, epoch) (`epoch_order`), so the RNG state of a run is just the
seed and the position (epoch, batch_in_epoch); there is no other randomness after initialisation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, JaxbenchError
from .locks import LOCK_NAME, RunLockedError, lock_path, locked  # noqa: F401  (run-dir API)

FORMAT = 1
STATE_FILE = "state.msgpack"
META_FILE = "meta.json"


class CheckpointError(JaxbenchError):
    """A run directory or checkpoint that cannot be used (missing, partial, corrupt)."""


# ---------------------------------------------------------------------------------------------
# Small JSON helpers
# ---------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    """The run's JSONL log (a torn last line, from a kill mid-write, is skipped)."""
    p = Path(run_dir) / "log.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled frame order of `epoch` (a pure function of seed and epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir, which: str) -> Path:
    return Path(run_dir) / "checkpoints" / which


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_checkpoint(path: str | os.PathLike) -> dict:
    """Meta of a complete checkpoint directory; `CheckpointError` naming what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: missing")
    meta_path, state_path = path / META_FILE, path / STATE_FILE
    if not meta_path.exists():
        raise CheckpointError(f"checkpoint {path}: partial ({META_FILE} missing: the write did not complete)")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "sha256" not in meta:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is not a jaxbench checkpoint (format {FORMAT})")
    if not state_path.exists():
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} missing")
    digest = _sha256(state_path)
    if digest != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is corrupt (sha256 {digest[:12]}..., meta says {meta['sha256'][:12]}...)")
    return meta


def remove_stale_temporaries(run_dir) -> list[Path]:
    """Delete what writers killed mid-write left in a run directory (``.NAME.tmp-PID`` files and checkpoint
    directories); call with the run's lock held (nobody else is writing). Returns what was removed."""
    removed = []
    for d in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not d.is_dir():
            continue
        for p in d.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def save_checkpoint(run_dir, which: str, state: dict, meta: dict) -> Path:
    """Write checkpoint `which` ('last' or 'best') atomically; the previous complete one becomes `<which>.prev`."""
    from flax import serialization

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / which
    tmp = root / f".{which}.tmp-{os.getpid()}"
    for stale in root.glob(f".{which}.tmp-*"):  # left by a writer killed mid-write (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    data = serialization.to_bytes(state)
    with open(tmp / STATE_FILE, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    meta = dict(meta, format=FORMAT, sha256=hashlib.sha256(data).hexdigest())
    with open(tmp / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    prev = root / f"{which}.prev"
    if final.exists():
        try:
            check_checkpoint(final)
            good = True
        except CheckpointError:
            good = False
        if good:
            if prev.exists():
                shutil.rmtree(prev)
            os.rename(final, prev)
        else:  # never rotate a corrupt checkpoint over the good .prev
            k = 0
            while (root / f"{which}.corrupt-{k}").exists():
                k += 1
            os.rename(final, root / f"{which}.corrupt-{k}")
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def find_checkpoint(run_dir, order=("last", "last.prev", "best", "best.prev"), warn=True) -> tuple[Path, dict]:
    """The first complete checkpoint in `order`; each unusable one is named in a warning."""
    problems = []
    for which in order:
        path = checkpoint_dir(run_dir, which)
        if not path.exists():
            continue
        try:
            meta = check_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            if warn:
                warnings.warn(f"{e}; falling back to an older checkpoint", stacklevel=2)
            continue
        return path, meta
    detail = ("; ".join(problems)) if problems else "no checkpoints written yet"
    raise CheckpointError(f"run {run_dir}: no usable checkpoint ({detail})")


def load_checkpoint(path, target=None) -> dict:
    """State of a checkpoint: restored into `target`'s structure when given, else raw nested dicts."""
    from flax import serialization

    path = Path(path)
    data = (path / STATE_FILE).read_bytes()
    try:
        if target is None:
            return serialization.msgpack_restore(data)
        return serialization.from_bytes(target, data)
    except Exception as e:  # noqa: BLE001 - any decoding failure means a bad checkpoint
        raise CheckpointError(f"checkpoint {path}: cannot decode {STATE_FILE} ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------
def read_run(run_dir) -> dict[str, Any]:
    """card, statistics, dataset and config of a run directory."""
    from .stats import DatasetStatistics

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    card = _read_object(run_dir / "card.json", ("name", "architecture", "hyperparameters"))
    stats = DatasetStatistics.from_json(read_json(run_dir / "statistics.json"), file=str(run_dir / "statistics.json"))
    dataset = _read_object(run_dir / "dataset.json", ("name",))
    config = _read_object(run_dir / "config.json", ()) if (run_dir / "config.json").exists() else {}
    return dict(card=card, statistics=stats, dataset=dataset, config=config)


def _read_object(path: Path, required: tuple[str, ...]) -> dict:
    """A JSON object with the `required` keys (what the run's writer always puts there)."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", file=str(path))
    for k in required:
        if k not in obj:
            raise DataError("missing: the file is not what `jaxbench train` writes", file=str(path), key=k)
    return obj


def load_potential(run_dir, which: str = "best"):
    """(Potential, params) of a trained run: the parameters its validation used (`inference_params`: the SWA
    average, the EMA or the trained weights).

    `which` is 'best' (falls back to best.prev, then last, last.prev) or 'last' (falls back to last.prev,
    best, best.prev). Parameters come back in the dtype they were trained in (`cast_params` to change)."""
    from .potential import Potential

    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    info = read_run(run_dir)
    pot = Potential.from_card(info["card"], info["statistics"])
    order = ("best", "best.prev", "last", "last.prev") if which == "best" else ("last", "last.prev", "best", "best.prev")
    path, meta = find_checkpoint(run_dir, order)
    state = load_checkpoint(path)
    return pot, inference_params(state, meta)


def inference_params(state: dict, meta: dict):
    """The parameters a checkpoint stands for: the SWA average when the run validated with it, else the EMA
    when the run kept one, else the trained parameters."""
    if meta.get("swa_average") and int(meta.get("swa_count", 0)) > 0 and state.get("swa_params") is not None:
        return state["swa_params"]
    if meta.get("ema") and state.get("ema_params") is not None:
        return state["ema_params"]
    return state["params"]


def load_energy_model(spec: str):
    """RUN: a trained run directory (jaxbench.runs.load_potential), or 'module:attr' naming an
    EnergyModel, a (Potential, params) pair, or a zero-argument factory of either
    (e.g. 'jaxbench.md:morse')."""
    import importlib

    from . import md

    if Path(spec).is_dir():
        pot, params = load_potential(spec, which="best")
        return md.as_energy_model(pot, params=params)
    if ":" in spec:
        mod, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise JaxbenchError(f"cannot import energy model '{spec}': {e}") from None
        if callable(obj) and not isinstance(obj, md.EnergyModel):
            obj = obj()
        if isinstance(obj, tuple):
            return md.as_energy_model(obj[0], params=obj[1])
        return md.as_energy_model(obj)
    raise JaxbenchError(f"RUN '{spec}' is neither a run directory nor 'module:attr'")
