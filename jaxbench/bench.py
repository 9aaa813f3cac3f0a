"""The end-to-end benchmark: train (or reuse) a model, evaluate it, simulate it, score the simulation.

    bench(model, dataset, out) -> results      (`jaxbench bench --model CARD --dataset NAME`)

One directory per benchmark::

    out/
      train/                 the training run (jaxbench.runs layout), unless an existing run is given
      trajectory.h5          the model's rollout (H5MD, all replicas)
      reference.h5           the oracle's rollout from the same initial state (when an oracle is given)
      results.json           every number with its unit, written after every stage
      report.md              the same as a readable page, with the plots
      *.png                  RDF / h(r) overlays, EV and FV against time, MSD, temperature and energy traces

A number is reported only where it can be computed honestly: otherwise the entry is
``{"value": null, "not_applicable": "<reason>"}``. Failed replicas are results (time to failure),
and structure / dynamics metrics use each replica's stable part only.

Reference for the trajectory metrics, in order of preference:
  * an oracle (any EnergyModel, e.g. the classical potential that generated the data): its own rollout
    from the same positions and velocities gives EGraFFBench's EV(t) / FV(t), the reference RDF and the
    reference diffusivity; it also scores the model's own frames (model vs oracle on the same positions);
  * a time-ordered split of the dataset (data card ``trajectory:``, e.g. MD17 test files at 0.5 fs):
    EV / FV against the ground-truth frames at the same times, as EGraFFBench did;
  * the dataset's test frames as an equilibrium sample: reference RDF / h(r) only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import runs
from .errors import JaxbenchError

# Histogram defaults (METRIC_NOTES: bin width and range move WF a lot, so both are recorded).
DR = 0.05  # Å
RDF_R_MAX = 6.0  # Å, periodic g(r) (all images)
HR_R_MAX = 10.0  # Å, molecular h(r)
RDF_STABILITY = dict(window_fs=1000.0, threshold=1.0)  # FaNE: 1 ps window, Delta = 1.0 (LiPS)


def na(reason: str) -> dict[str, Any]:
    return {"value": None, "not_applicable": reason}


def _stats(values) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"mean": None, "std": None, "per_replica": [None if x is None else float(x) for x in values]}
    return {"mean": float(v.mean()), "std": float(v.std()), "per_replica": [None if x is None else float(x) for x in values]}


@dataclasses.dataclass
class BenchSettings:
    dr: float = DR
    rdf_r_max: float | None = None  # default RDF_R_MAX (periodic) / HR_R_MAX (molecules)
    msd_equilibration_fraction: float = 0.2
    msd_window_fraction: float = 0.5
    rdf_stability_window_fs: float = RDF_STABILITY["window_fs"]
    rdf_stability_threshold: float = RDF_STABILITY["threshold"]


class _Results:
    """results.json, rewritten atomically after every stage so an interrupted bench keeps what it finished."""

    def __init__(self, path: Path, initial: dict):
        self.path = path
        self.data = initial
        self.save()

    def __setitem__(self, key, value):
        self.data[key] = value
        self.save()

    def __getitem__(self, key):
        return self.data[key]

    def save(self):
        runs.write_json(self.path, self.data)


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------
def _train_stage(model, dataset, run_dir: Path, reuse: bool, train_kw: dict) -> dict[str, Any]:
    from .train import train

    ckpt = run_dir / "checkpoints"
    has_ckpt = ckpt.is_dir() and any(ckpt.iterdir())
    if has_ckpt and reuse:
        summary = {"reused": True, "run_dir": str(run_dir)}
    else:
        summary = train(model, dataset, out=run_dir, resume=has_ckpt, **train_kw)
        summary = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, type(None)))}
        summary["reused"] = False
    log = runs.read_log(run_dir)
    epochs = [e for e in log if e.get("event") == "epoch" and "epoch_time_s" in e]
    times = [e["epoch_time_s"] for e in epochs[1:]] or [e["epoch_time_s"] for e in epochs]  # first epoch compiles
    summary["epochs"] = len(epochs)
    summary["time_per_epoch_min"] = float(np.median(times)) / 60.0 if times else None
    return summary


def _positions_of_frames(frames) -> np.ndarray | None:
    n = np.asarray(frames.n_atoms)
    if len(n) == 0 or not np.all(n == n[0]):
        return None
    return np.asarray(frames.positions).reshape(len(n), int(n[0]), 3)


def _split_reference(dataset, split, n_atoms, data_dir=None):
    """Reference frames from a dataset split: ``(positions [T, N, 3], cells [T, 3, 3])``, or
    ``(None, None)`` when the split's frames do not all have the ``n_atoms`` simulated atoms."""
    from . import data

    frames = data.load(dataset, split, data_dir=data_dir)
    pos = _positions_of_frames(frames)
    if pos is None or pos.shape[1] != n_atoms:
        return None, None
    return pos, np.asarray(frames.cell)


def _hist_frames(positions, cell, pbc, species, settings, periodic):
    """Per-frame g(r) (periodic, all images) or h(r) (molecules) with the bench's bins."""
    from . import metrics as M

    r_max = settings.rdf_r_max or (RDF_R_MAX if periodic else HR_R_MAX)
    if periodic:
        return M.rdf_frames(positions, cell, pbc, species, r_max, settings.dr)
    return M.distance_histogram_frames(positions, r_max, settings.dr)


def _structure(traj, ref_positions, ref_cells, pbc, species, stable_frames, settings, periodic, dt_frame_fs):
    """g(r) (periodic, all images) or h(r) (molecules) of each replica's stable part vs the reference."""
    import jax.numpy as jnp

    from . import metrics as M

    r_max = settings.rdf_r_max or (RDF_R_MAX if periodic else HR_R_MAX)
    dr = settings.dr
    pos = np.asarray(traj["position"])  # [R, T, N, 3]
    R, T = pos.shape[:2]

    def hist_frames(p, cell):
        return _hist_frames(p, cell, pbc, species, settings, periodic)

    r, g_ref_frames = hist_frames(ref_positions, ref_cells)
    g_ref = np.asarray(jnp.mean(g_ref_frames, axis=0))
    half = len(ref_positions) // 2
    floor = None
    if half >= 2:
        a, b = np.asarray(g_ref_frames[:half]).mean(0), np.asarray(g_ref_frames[half:]).mean(0)
        floor = dict(wright_factor_pct=float(M.wright_factor(a, b)), jsd_nats=float(M.jensen_shannon(a, b)),
                     rdf_mae=float(M.rdf_mae(a, b, dr)))
    per = {"wright_factor_pct": [], "wright_factor_unrooted_pct": [], "jsd_nats": [], "rdf_mae": []}
    g_model, g_model_frames = [], []
    for rep in range(R):
        _, gf = hist_frames(pos[rep], traj["cell"])
        g_model_frames.append(np.asarray(gf))
        n_ok = int(stable_frames[rep])
        if n_ok < 1:
            for k in per:
                per[k].append(None)
            g_model.append(None)
            continue
        g = np.asarray(gf[:n_ok]).mean(0)
        g_model.append(g)
        per["wright_factor_pct"].append(float(M.wright_factor(g, g_ref)))
        per["wright_factor_unrooted_pct"].append(float(M.wright_factor(g, g_ref, root=False)))
        per["jsd_nats"].append(float(M.jensen_shannon(g, g_ref)))
        per["rdf_mae"].append(float(M.rdf_mae(g, g_ref, dr)))
    out = {
        "kind": "g(r), total, all periodic images" if periodic else "h(r), all pairs (FaNE eq. 1)",
        "r_max_A": r_max, "dr_A": dr,
        "reference_frames": int(len(ref_positions)),
        "units": {"wright_factor_pct": "%", "wright_factor_unrooted_pct": "% (EGraFFBench eq. 2 as printed)",
                  "jsd_nats": "nats", "rdf_mae": "Å (g) / 1 (h)"},
        "noise_floor_reference_halves": floor,
    }
    out.update({k: _stats(v) for k, v in per.items()})
    arrays = dict(r=np.asarray(r), g_ref=g_ref, g_model=g_model, g_model_frames=g_model_frames)
    return out, arrays


def _rdf_hook(start, ref_pos, ref_cells, proto, settings):
    """FaNE eq. 8 as the MD engine's failure hook (windowed RDF deviation from the reference g(r)),
    or ``(None, reason)`` when the run cannot hold one window."""
    from . import metrics as M

    dt_frame = proto.timestep_fs * proto.save_every
    window = int(round(settings.rdf_stability_window_fs / dt_frame))
    n_frames = proto.steps // proto.save_every + 1
    if window < 1 or window > n_frames:
        return None, (f"the RDF criterion needs a {settings.rdf_stability_window_fs:g} fs window ({window} frames); "
                      f"the run saves {n_frames} frames")
    _, g_ref_frames = _hist_frames(ref_pos, ref_cells, start.pbc, start.numbers, settings, True)
    g_ref = np.asarray(g_ref_frames).mean(0)
    r_max = settings.rdf_r_max or RDF_R_MAX
    hook = M.rdf_stability_hook(g_ref, start.cell, start.pbc, start.numbers, r_max, settings.dr, window,
                                settings.rdf_stability_threshold)
    return hook, window


def _violations(e_model, f_model, e_ref, f_ref, n_valid, source: str) -> dict[str, Any]:
    """EV(t), FV(t) per replica over its first n_valid frames, geometric means, mean/std over replicas."""
    from . import metrics as M

    ev_gm, fv_gm, curves = [], [], {"EV": [], "FV": []}
    for rep in range(len(e_model)):
        n = int(n_valid[rep])
        if n < 1:
            ev_gm.append(None)
            fv_gm.append(None)
            curves["EV"].append([])
            curves["FV"].append([])
            continue
        ev = np.asarray(M.energy_violation(e_model[rep, :n], e_ref[rep, :n]))
        fv = np.asarray(M.force_violation(f_model[rep, :n], f_ref[rep, :n]))
        curves["EV"].append(ev.tolist())
        curves["FV"].append(fv.tolist())
        # t = 0 is the shared start: EV = FV = 0 there only if the model is exact; a zero would
        # make the geometric mean 0, so the mean runs over t > 0 when there is more than one frame.
        sl = slice(1, None) if n > 1 else slice(None)
        ev_gm.append(float(M.geometric_mean(np.maximum(ev[sl], 1e-30))))
        fv_gm.append(float(M.geometric_mean(np.maximum(fv[sl], 1e-30))))
    return {"reference": source, "EV": _stats(ev_gm), "FV": _stats(fv_gm),
            "units": {"EV": "1 (EGraFFBench Table 3 prints EV x 1e5)", "FV": "1"},
            "frames_compared": [int(n) for n in n_valid], "curves": curves}


def _unwrapped_positions(traj):
    from . import metrics as M

    pos = np.asarray(traj["position"])
    return np.stack([np.asarray(M.unwrap(p, traj["cell"], traj["pbc"])) for p in pos])


def _diffusivity(traj, stable_frames, dt_frame_fs, settings, species) -> dict[str, Any]:
    from . import metrics as M

    pos = _unwrapped_positions(traj)
    out = {}
    for z in sorted(set(np.asarray(species).tolist())):
        vals = []
        for rep in range(pos.shape[0]):
            n = int(stable_frames[rep])
            eq = int(settings.msd_equilibration_fraction * n)
            window = int(settings.msd_window_fraction * (n - eq))
            if window < 3:
                vals.append(None)
                continue
            vals.append(float(M.diffusivity(pos[rep, :n], dt_frame_fs, window, eq, species=species, select=z)))
        from ase.data import chemical_symbols

        out[chemical_symbols[z]] = _stats(vals)
    return out


# --------------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------------
def bench(
    model,
    dataset: str,
    out,
    *,
    run=None,
    train_budget="60m",
    max_epochs: int | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    protocol="egraffbench",
    replicas: int | None = None,
    steps: int | None = None,
    temperature: float | None = None,
    timestep: float | None = None,
    oracle=None,
    seed: int = 0,
    dtype: str = "float32",
    settings: BenchSettings | None = None,
    progress: bool = True,
    data_dir=None,
    plots: bool = True,
    train_kw: dict | None = None,
    reference_split: str | None = "auto",
) -> dict[str, Any]:
    """Train (or reuse `run`), evaluate, simulate and score `model` on `dataset`; write `out`.

    `model`: a model card name or dict (ignored when `run` is given). `protocol`: a protocol card name,
    YAML path or :class:`jaxbench.md.Protocol`; `replicas` / `steps` / `temperature` / `timestep`
    override it. `oracle`: an :class:`jaxbench.md.EnergyModel` that is the ground truth (e.g. the
    classical potential behind a generated dataset). `reference_split`: the frames that are the structure
    reference without an oracle ('auto': the test set at the protocol's temperature, e.g. 3BPA's
    test_600K at 600 K; None: no reference frames at this state point). Re-running with the same `out` reuses the finished
    training run (and resumes an interrupted one). Returns the results dict (also in out/results.json).
    """
    from . import data, md, trajectory
    from . import metrics as M
    from .evaluate import evaluate

    settings = settings or BenchSettings()
    out = Path(out)
    spec = data.get(dataset)
    dataset = spec.name
    # ---- everything that can fail cheaply, before compute --------------------------------------
    proto = protocol if isinstance(protocol, md.Protocol) else md.load_protocol(protocol, dataset)
    proto = proto.replace(replicas=replicas, steps=steps, temperature_K=temperature, timestep_fs=timestep).validate()
    if reference_split == "auto":
        from .tasks import _reference_split

        reference_split = _reference_split(dataset, proto)
    run_dir = Path(run) if run is not None else out / "train"
    if run is not None:
        runs.read_run(run_dir)  # names a missing / broken run now
    out.mkdir(parents=True, exist_ok=True)
    res = _Results(out / "results.json", {
        "jaxbench_bench": 1, "dataset": dataset, "periodic": spec.periodic, "started": time.time(),
        "protocol": proto.to_dict(), "settings": dataclasses.asdict(settings),
        "oracle": getattr(oracle, "name", None) if oracle is not None else None,
    })

    # ---- 1. train ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    kw = dict(budget=train_budget, max_epochs=max_epochs, seed=seed, dtype=dtype, n_train=n_train, n_val=n_val,
              progress=progress, data_dir=data_dir)
    kw.update(train_kw or {})
    res["training"] = _train_stage(model, dataset, run_dir, reuse=run is not None or (out / "results.json").exists()
                                   and _training_finished(run_dir), train_kw=kw)
    res["training"]["wall_s"] = time.perf_counter() - t0
    info = runs.read_run(run_dir)
    res["model"] = info["card"]["name"]
    res["architecture"] = info["card"].get("architecture")
    res["run_dir"] = str(run_dir)

    # ---- 2. evaluate ---------------------------------------------------------------------------
    ev = evaluate(run_dir, dataset, "test", n_frames=n_test, plots=plots, data_dir=data_dir)
    res["accuracy"] = {"split": "test", "frames": ev["metrics"].get("n_frames"), **ev["metrics"],
                       "parity_plot": ev.get("plot")}

    # ---- 3. simulate ---------------------------------------------------------------------------
    pot, params = runs.load_potential(run_dir, "best")
    frames = data.load(dataset, proto.frame_split, data_dir=data_dir)
    start = _start(frames, proto, spec.trajectory)
    n_atoms = start.n_atoms
    periodic = bool(np.any(start.pbc))
    # the reference comes first: the RDF stability criterion runs inside the model's rollout
    ref_traj = None
    if oracle is not None:
        ref = md.simulate(oracle, start, proto, seed=seed, out=out / "reference.h5", overwrite=True, progress=progress)
        ref_traj = trajectory.read(ref.path)
    if ref_traj is not None:
        ref_pos = np.asarray(ref_traj["position"]).reshape(-1, n_atoms, 3)
        ref_cells = np.broadcast_to(np.asarray(ref_traj["cell"]), (len(ref_pos), 3, 3))
        ref_name = f"oracle '{res['oracle']}' rollout, all replicas"
    elif reference_split is not None:
        ref_pos, ref_cells = _split_reference(dataset, reference_split, n_atoms, data_dir)
        ref_name = f"dataset '{dataset}' split '{reference_split}'"
    else:
        ref_pos, ref_name = None, None
    hook, rdf_window = None, None
    if periodic:
        if ref_pos is None:
            rdf_window = "no reference RDF: " + (f"the reference frames ({ref_name}) do not all have the simulated atoms"
                                                  if ref_name else "no reference frames and no oracle")
        else:
            hook, rdf_window = _rdf_hook(start, ref_pos, ref_cells, proto, settings)
    sim = md.simulate(pot, start, proto, params=params, seed=seed, out=out / "trajectory.h5", overwrite=True,
                      progress=progress, failure_fn=hook)
    traj = trajectory.read(sim.path)
    n_saved = len(traj["step"])
    dt_frame = proto.timestep_fs * proto.save_every
    fail_frames = np.where(sim.failure_step >= 0, np.ceil(sim.failure_step / proto.save_every).astype(int), n_saved)
    fail_frames = np.minimum(fail_frames, n_saved)
    timings = sim.timings
    steady = timings.get("chunks_s")
    steady_steps = sim.steps_done - proto.chunk_steps if steady else None
    spd = M.speed(n_atoms * proto.replicas, steady_steps, steady, proto.timestep_fs) if steady and steady_steps else \
        M.speed(n_atoms * proto.replicas, sim.steps_done, timings["total_s"], proto.timestep_fs)
    res["simulation"] = {
        "trajectory": str(sim.path), "replicas": proto.replicas, "devices": int(sim.devices), "steps": int(sim.steps_done),
        "atoms": int(n_atoms),
        "frames_saved": int(n_saved), "frame_interval_fs": dt_frame, "start_frames": list(start.frame_indices or []),
        "failed": [bool(x) for x in sim.failed], "failure_time_fs": [None if not np.isfinite(x) else float(x)
                                                                    for x in sim.failure_time_fs],
        "failure_reason": [md.describe_failure(int(x)) if f else None for x, f in zip(sim.failure_reason, sim.failed)],
        "stable_fraction": float(np.mean(~np.asarray(sim.failed))),
        "timings_s": {k: float(v) for k, v in timings.items()},
        "inference_time_min": float(timings["total_s"]) / 60.0,
        "speed": {"atom_steps_per_s": spd.atom_steps_per_s, "ns_per_day": spd.ns_per_day,
                  "us_per_step_atom": spd.us_per_step_atom,
                  "note": "steady state (chunks after the first, all replicas' atoms)" if steady else "including compile"},
    }

    # ---- 4. metrics ----------------------------------------------------------------------------
    species = np.asarray(traj["species"])
    pbc = np.asarray(traj["pbc"])
    ordered = spec.trajectory

    # stability: MD failures (the RDF criterion is one of them for periodic systems)
    rdf_failed = (np.asarray(sim.failure_reason) & 8) != 0 if hook is not None else np.zeros(len(fail_frames), bool)
    stab = {"md_failures": res["simulation"]["failure_time_fs"],
            "criterion_in_md": "NaN / temperature bounds" + ("" if periodic else
                                                               f", bond length (> 0.5 Å, bonds at {proto.bond_factor} x covalent radii)")}
    # EV / FV run to the MD failure, as EGraFFBench's; an RDF failure is dated at the start of its window
    # but the frames up to the window's end are real dynamics
    md_fail_frames = np.where(rdf_failed, np.minimum(fail_frames + (rdf_window if hook is not None else 0), n_saved),
                              fail_frames)
    if periodic:
        if hook is None:
            stab["rdf"] = na(rdf_window)
        else:
            stab["criterion_in_md"] += (f", RDF (FaNE eq. 8: {settings.rdf_stability_window_fs:g} fs window, "
                                        f"Delta {settings.rdf_stability_threshold})")
            stab["rdf"] = {"criterion": f"FaNE eq. 8: window {settings.rdf_stability_window_fs:g} fs ({rdf_window} frames), "
                                        f"Delta {settings.rdf_stability_threshold}, evaluated inside the MD engine",
                           "failed": [bool(x) for x in rdf_failed],
                           "first_unstable_frame": [int(f) for f in fail_frames],
                           "stable_time_fs": [min(float(f) * dt_frame, sim.steps_done * proto.timestep_fs) for f in fail_frames]}
    total_fs = sim.steps_done * proto.timestep_fs
    stab["stable_time_fs"] = _stats([min(float(f) * dt_frame, total_fs) for f in fail_frames])
    stab["simulated_time_fs"] = total_fs

    # structure: reference = oracle rollout (pooled replicas) or the dataset's test frames
    structure_arrays = None
    if ref_name is None:
        res["structure"] = na(f"dataset '{dataset}' has no reference frames at {proto.temperature_K:g} K and no oracle "
                              "was given")
    elif ref_pos is None:
        res["structure"] = na(f"the reference frames ({ref_name}) do not all have the simulated atoms")
    else:
        try:
            st, structure_arrays = _structure(traj, ref_pos, ref_cells, pbc, species, fail_frames, settings, periodic, dt_frame)
            st["reference"] = ref_name
            res["structure"] = st
        except ValueError as e:
            res["structure"] = na(str(e))

    res["stability"] = stab

    # EV / FV
    e_model, f_model = np.asarray(traj["potential_energy"]), np.asarray(traj["force"])
    if ref_traj is not None:
        n_valid = np.minimum(md_fail_frames, n_saved)
        res["violation"] = _violations(e_model, f_model, np.asarray(ref_traj["potential_energy"]),
                                       np.asarray(ref_traj["force"]), n_valid, ref_name)
        # model vs oracle on the model's own frames
        e_or, f_or = _oracle_on_frames(oracle, traj)
        res["oracle_on_model_frames"] = _violations(e_model, f_model, e_or, f_or, n_valid,
                                                    f"oracle '{res['oracle']}' on the model's frames")
        res["oracle_on_model_frames"]["force_mae_meV_A"] = _stats([
            float(np.abs(f_model[r, : n_valid[r]] - f_or[r, : n_valid[r]]).mean() * 1000) if n_valid[r] else None
            for r in range(len(n_valid))])
    elif ordered and proto.frame_split == ordered["split"]:
        res["violation"] = _violations_vs_split(dataset, ordered, start, proto, e_model, f_model, md_fail_frames, data_dir)
    else:
        reason = (f"no ground-truth trajectory: dataset '{dataset}' has no time-ordered split (its card has no "
                  "`trajectory:`) and no oracle was given" if not ordered else
                  f"replicas start from split '{proto.frame_split}', the time-ordered split is '{ordered['split']}'")
        res["violation"] = na(reason)

    # dynamics (periodic systems: diffusion)
    if periodic:
        dyn = {"diffusivity_cm2_s": _diffusivity(traj, fail_frames, dt_frame, settings, species),
               "window": f"{settings.msd_window_fraction:g} of the stable frames after {settings.msd_equilibration_fraction:g} equilibration"}
        if ref_traj is not None:
            dyn["reference_diffusivity_cm2_s"] = _diffusivity(ref_traj, np.full(len(ref_traj["position"]), n_saved),
                                                              dt_frame, settings, species)
        elif spec_observables(spec).get("diffusivity_cm2_s"):
            dyn["reference_diffusivity_cm2_s"] = spec_observables(spec)["diffusivity_cm2_s"]
        else:
            dyn["reference_diffusivity_cm2_s"] = na("the reference frames are not a trajectory (no oracle; "
                                                    "LiPS frames are shuffled)" if not ordered else
                                                    "not computed from the dataset split")
        res["dynamics"] = dyn
    else:
        res["dynamics"] = na("diffusivity is computed for periodic systems")
    res["finished"] = time.time()

    # ---- 5. plots + report ---------------------------------------------------------------------
    if plots:
        res["plots"] = _plots(out, res.data, traj, ref_traj, structure_arrays, dt_frame)
    from .report import write_bench_report

    write_bench_report(out, res.data)
    return res.data


def _start(frames, proto, ordered):
    """Replica starts. From a time-ordered split with replica_init 'frames', the starts are spread only
    over the frames that leave a whole ground-truth trajectory ahead of every replica (for EV / FV);
    when the split is just long enough for one, every replica starts at its first frame (distinct
    velocity seeds), as EGraFFBench's MD17 runs must have."""
    import dataclasses as dc

    from . import md

    if not (ordered and proto.replica_init == "frames" and proto.frame_split == ordered["split"]):
        return md.start_from_frames(frames, proto.replicas, mode=proto.replica_init)
    needed = int(math.ceil(proto.steps * proto.timestep_fs / float(ordered["frame_interval_fs"])))
    last = max(0, len(frames) - 1 - needed)
    idx = np.linspace(0, last, proto.replicas).round().astype(int).tolist()
    f0 = frames.frame(idx[0])
    pos = np.stack([frames.frame(i)["positions"] for i in idx])
    return dc.replace(md.Start.make(pos, f0["numbers"], f0["cell"], f0["pbc"]), frame_indices=tuple(idx))


def spec_observables(spec) -> dict:
    """Published reference observables from the dataset card (`observables:`), e.g. LiPS's Li diffusivity."""
    from .cards import read_card

    return read_card(spec.card_path).get("observables") or {}


def _training_finished(run_dir: Path) -> bool:
    log = runs.read_log(run_dir) if (run_dir / "log.jsonl").exists() else []
    return any("stop_reason" in e and e["stop_reason"] for e in log)


def _oracle_on_frames(oracle, traj):
    """Oracle energies [R, T] and forces [R, T, N, 3] on the saved model frames."""
    from .oracle import evaluate_frames

    ref = evaluate_frames(oracle, traj)
    return np.asarray(ref["energy"]), np.asarray(ref["forces"])


def _violations_vs_split(dataset, ordered, start, proto, e_model, f_model, fail_frames, data_dir):
    from . import data

    interval = float(ordered["frame_interval_fs"])
    dt_frame = proto.timestep_fs * proto.save_every
    ratio = dt_frame / interval
    if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
        return na(f"saved frames every {dt_frame:g} fs do not fall on the reference frames ({interval:g} fs apart)")
    ratio = int(round(ratio))
    ref = data.load(dataset, ordered["split"], data_dir=data_dir)
    if ref.energy is None or ref.forces is None:
        return na(f"split '{ordered['split']}' lacks energies or forces")
    n_atoms = start.n_atoms
    R, T = e_model.shape
    e_ref, f_ref = np.zeros((R, T)), np.zeros((R, T, n_atoms, 3))
    n_valid = np.zeros(R, int)
    starts = list(start.frame_indices or [0] * R)
    forces = np.asarray(ref.forces).reshape(len(ref), n_atoms, 3)
    for rep in range(R):
        idx = starts[rep] + ratio * np.arange(T)
        ok = idx < len(ref)
        n = int(min(ok.sum(), fail_frames[rep]))
        n_valid[rep] = n
        e_ref[rep, :n] = np.asarray(ref.energy)[idx[:n]]
        f_ref[rep, :n] = forces[idx[:n]]
    out = _violations(e_model, f_model, e_ref, f_ref, n_valid,
                      f"dataset '{dataset}' split '{ordered['split']}' as a trajectory ({interval:g} fs per frame)")
    out["note"] = ("each replica is compared with the ground-truth frames that follow its start frame, while they "
                   "last; replicas started near the end of the split have few or no frames to compare")
    return out


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------
def _plots(out: Path, results: dict, traj, ref_traj, structure, dt_frame) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    t_ps = np.asarray(traj["time"]) / 1000.0
    if structure is not None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(structure["r"], structure["g_ref"], "k-", lw=2, label="reference")
        for rep, g in enumerate(structure["g_model"]):
            if g is not None:
                ax.plot(structure["r"], g, lw=1, alpha=0.8, label=f"model, replica {rep}")
        ax.set_xlabel("r (Å)")
        ax.set_ylabel("g(r)" if results["periodic"] else "h(r) (1/Å)")
        ax.legend(fontsize=6)
        ax.set_title(f"{results['model']} on {results['dataset']}", fontsize=9)
        fig.tight_layout()
        paths["rdf"] = str(out / "rdf.png")
        fig.savefig(paths["rdf"], dpi=120)
        plt.close(fig)
    viol = results.get("violation", {})
    if viol.get("curves"):
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for key, ax in zip(("EV", "FV"), axes):
            for rep, c in enumerate(viol["curves"][key]):
                if len(c):
                    ax.semilogy(t_ps[: len(c)], np.maximum(c, 1e-16), lw=1, label=f"replica {rep}")
            ax.set_xlabel("t (ps)")
            ax.set_ylabel(key)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=6)
        fig.suptitle(f"vs {viol['reference']}", fontsize=8)
        fig.tight_layout()
        paths["violation"] = str(out / "violation.png")
        fig.savefig(paths["violation"], dpi=120)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for rep in range(np.asarray(traj["temperature"]).shape[0]):
        axes[0].plot(t_ps, traj["temperature"][rep], lw=1)
        axes[1].plot(t_ps, traj["potential_energy"][rep] - traj["potential_energy"][rep][0], lw=1)
    axes[0].set_xlabel("t (ps)")
    axes[0].set_ylabel("T (K)")
    axes[1].set_xlabel("t (ps)")
    axes[1].set_ylabel("E_pot - E_pot(0) (eV)")
    fig.tight_layout()
    paths["traces"] = str(out / "traces.png")
    fig.savefig(paths["traces"], dpi=120)
    plt.close(fig)
    if results["periodic"]:
        from . import metrics as M

        fig, ax = plt.subplots(figsize=(5, 3.5))
        species = np.asarray(traj["species"])
        for label, tr, style in (("model", traj, "-"), ("reference", ref_traj, "--")):
            if tr is None:
                continue
            pos = _unwrapped_positions(tr)
            for z in sorted(set(species.tolist())):
                from ase.data import chemical_symbols

                m = np.mean([np.asarray(M.msd(p, species, z)) for p in pos], axis=0)
                ax.plot(t_ps[: len(m)], m, style, label=f"{label} {chemical_symbols[z]}")
        ax.set_xlabel("t (ps)")
        ax.set_ylabel("MSD (Å²)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["msd"] = str(out / "msd.png")
        fig.savefig(paths["msd"], dpi=120)
        plt.close(fig)
    if results.get("accuracy", {}).get("parity_plot"):
        paths["parity"] = results["accuracy"]["parity_plot"]
    return paths


def load_results(path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise JaxbenchError(f"no benchmark results at {p} (run `jaxbench bench` first)")
    with open(p) as f:
        return json.load(f)


__all__ = ["bench", "BenchSettings", "load_results", "na", "math"]
