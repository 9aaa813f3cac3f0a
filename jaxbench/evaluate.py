"""Errors of a trained run on a dataset split: `jaxbench evaluate RUN [--dataset NAME --split test]`.

Metrics (all over the frames / atoms that carry the label):

    energy_mae_meV, energy_rmse_meV                 |E_pred - E_ref| per frame, meV
    energy_mae_meV_atom, energy_rmse_meV_atom       the same divided by each frame's atom count
    forces_mae_meV_A, forces_rmse_meV_A             over every Cartesian force component, meV/Å
    stress_mae_meV_A3, stress_rmse_meV_A3, stress_mae_GPa   over the 9 components of frames with stress

Writes `RUN/results-<dataset>-<split>.json` (metrics, which checkpoint, frames) and a copy as
`RUN/results.json`, and parity plots `RUN/parity-<dataset>-<split>.png` (energy per atom, force components,
stress components where present).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import compiled, runs
from .frames import Frames

EV_A3_TO_GPA = 160.21766208


_PREDICT_CACHE: dict[str, Any] = {}
compiled.register(_PREDICT_CACHE.clear)


def _jitted_call(pot):
    """One jitted `pot.__call__` per model definition (card hyperparameters + statistics), so that evaluating
    several runs of the same model (tests, sweeps, CLI after Python) compiles once per batch shape."""
    import json

    key = json.dumps(dict(architecture=pot.card["architecture"], hp=pot.card["hyperparameters"],
                          stats=pot.statistics.to_json()), sort_keys=True, default=str)
    if key not in _PREDICT_CACHE:
        if len(_PREDICT_CACHE) > 8:
            _PREDICT_CACHE.clear()
        _PREDICT_CACHE[key] = jax.jit(pot.__call__, static_argnums=2)
    return _PREDICT_CACHE[key]


def predict(pot, params, fg, batch_size: int = 8, compute_stress: bool = False) -> dict[str, np.ndarray]:
    """Predictions for every frame of `fg` (FrameGraphs): energy [F], forces [A, 3], stress [F, 3, 3] (or None)."""
    fn = _jitted_call(pot)
    dtype = jax.tree.leaves(params)[0].dtype
    fr = fg.frames
    energy = np.zeros(len(fr))
    forces = np.zeros((int(fr.n_atoms.sum()), 3))
    stress = np.zeros((len(fr), 3, 3)) if compute_stress else None
    off = fr.offsets
    for start in range(0, len(fr), batch_size):
        idx = np.arange(start, min(start + batch_size, len(fr)))
        g = fg.batch(idx, n_graph=batch_size)
        g = g.replace(positions=np.asarray(g.positions, dtype=dtype))
        out = jax.device_get(fn(params, g, compute_stress))
        energy[idx] = out["energy"][: len(idx)]
        n = int(fr.n_atoms[idx].sum())
        forces[off[idx[0]] : off[idx[0]] + n] = out["forces"][:n]
        if compute_stress:
            stress[idx] = out["stress"][: len(idx)]
    return dict(energy=energy, forces=forces, stress=stress)


def compute_metrics(frames: Frames, pred: dict[str, np.ndarray]) -> dict[str, Any]:
    """Error metrics of predictions against the labels of `frames` (see the module docstring)."""
    m: dict[str, Any] = dict(n_frames=len(frames), n_atoms=int(frames.n_atoms.sum()))
    if frames.energy is not None:
        de = pred["energy"] - frames.energy
        dea = de / frames.n_atoms
        m.update(energy_mae_meV=1e3 * float(np.mean(np.abs(de))), energy_rmse_meV=1e3 * float(np.sqrt(np.mean(de**2))),
                 energy_mae_meV_atom=1e3 * float(np.mean(np.abs(dea))),
                 energy_rmse_meV_atom=1e3 * float(np.sqrt(np.mean(dea**2))))
    if frames.forces is not None:
        df = pred["forces"] - frames.forces
        m.update(forces_mae_meV_A=1e3 * float(np.mean(np.abs(df))), forces_rmse_meV_A=1e3 * float(np.sqrt(np.mean(df**2))))
    if frames.stress is not None and pred.get("stress") is not None and frames.has_stress.any():
        sel = frames.has_stress
        ds = pred["stress"][sel] - frames.stress[sel]
        m.update(stress_mae_meV_A3=1e3 * float(np.mean(np.abs(ds))), stress_rmse_meV_A3=1e3 * float(np.sqrt(np.mean(ds**2))),
                 stress_mae_GPa=EV_A3_TO_GPA * float(np.mean(np.abs(ds))), n_frames_stress=int(sel.sum()))
    return m


def parity_plot(frames: Frames, pred: dict[str, np.ndarray], path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if frames.energy is not None:
        panels.append(("energy / atom (eV)", frames.energy / frames.n_atoms, pred["energy"] / frames.n_atoms))
    if frames.forces is not None:
        panels.append(("force components (eV/Å)", frames.forces.ravel(), pred["forces"].ravel()))
    if frames.stress is not None and pred.get("stress") is not None and frames.has_stress.any():
        sel = frames.has_stress
        panels.append(("stress components (GPa)", EV_A3_TO_GPA * frames.stress[sel].ravel(), EV_A3_TO_GPA * pred["stress"][sel].ravel()))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (label, ref, prd) in zip(axes[0], panels):
        lo, hi = float(min(ref.min(), prd.min())), float(max(ref.max(), prd.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.scatter(ref, prd, s=3, alpha=0.5)
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate(
    run,
    dataset: str | None = None,
    split: str = "test",
    which: str = "best",
    n_frames: int | None = None,
    batch_size: int | None = None,
    plots: bool = True,
    data_dir=None,
) -> dict[str, Any]:
    """Metrics of the run's `which` checkpoint on `dataset` (default: the run's) / `split`; writes results and plots."""
    from . import data
    from .graph import build_graphs

    compiled.check()  # before this evaluation compiles (see jaxbench.compiled)
    run = Path(run)
    info = runs.read_run(run)  # names a missing / broken run before any data is read
    dataset = data.get(dataset, data_dir).name if dataset is not None else info["dataset"]["name"]
    spec = data.get(dataset, data_dir)
    if split not in spec.splits:
        from .errors import UnknownNameError

        raise UnknownNameError(f"split of dataset '{spec.name}'", split, spec.splits)
    pot, params = runs.load_potential(run, which)
    frames = data.load(dataset, split, data_dir=data_dir)
    if n_frames is not None:
        frames = frames[np.arange(min(n_frames, len(frames)))]
    pot.check_species(frames.numbers, where=f"dataset '{dataset}' split '{split}'")
    bs = batch_size or int(info["card"].get("training", {}).get("valid_batch_size", 0) or 0) or 8
    t0 = time.perf_counter()
    fg = build_graphs(frames, pot.r_max)
    want_stress = bool(frames.stress is not None and frames.has_stress.any())
    pred = predict(pot, params, fg, bs, compute_stress=want_stress)
    metrics = compute_metrics(frames, pred)
    path, meta = runs.find_checkpoint(run, ("best", "best.prev", "last", "last.prev") if which == "best" else
                                      ("last", "last.prev", "best", "best.prev"), warn=False)
    result = dict(run=str(run), model=pot.name, dataset=dataset, split=split, checkpoint=path.name,
                  step=meta.get("step"), epoch=meta.get("epoch"), ema=meta.get("ema"),
                  swa_average=bool(meta.get("swa_average") and meta.get("swa_count", 0) > 0), metrics=metrics,
                  wall_s=time.perf_counter() - t0, time=time.time())
    stem = f"{dataset}-{split}"
    out_path = run / f"results-{stem}.json"
    runs.write_json(out_path, result)
    runs.write_json(run / "results.json", result)
    if plots:
        result["plot"] = str(parity_plot(frames, pred, run / f"parity-{stem}.png", f"{pot.name} on {dataset} / {split}"))
        runs.write_json(out_path, result)
        runs.write_json(run / "results.json", result)
    result["results_path"] = str(out_path)
    return result
