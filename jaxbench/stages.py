"""The stages of the benchmark, each a function with a typed result, in the order `jaxbench.bench.bench`
runs them::

    train_stage      -> Training        the run (trained here, resumed, or reused)
    evaluate_stage   -> Accuracy        energy / force errors on the test split
    simulate_stage   -> Simulation      the model's rollout, the reference it is scored against
    score_structure  -> StructureScore  g(r) / h(r) against the reference
    score_stability, score_violations, score_oracle_on_model_frames, score_dynamics -> results sections
    plot_stage       -> {name: path}    the figures

Each stage reads only its arguments and the files of the stages before it; `bench` writes what each
returns into results.json as soon as it has it (so an interrupted benchmark keeps what it finished),
and resume or suites can call a stage on its own.

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
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import runs
from .reference import reference_frames
from .scoring import (
    BenchSettings,
    diffusivity_per_element,
    energy_force_violations,
    na,
    oracle_on_frames,
    rdf_failure_hook,
    rdf_window_deviation,
    reference_observables,
    replica_stats,
    structure_vs_reference,
    violations_vs_split,
)

Section = dict[str, Any]  # one entry of results.json


# --------------------------------------------------------------------------------------------------
# 1. train
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Training:
    section: Section  # results["training"]
    run_dir: Path
    model: str  # the model card's name
    architecture: str | None


def training_finished(run_dir: Path) -> bool:
    """The run's log records why training stopped (budget, epochs, early stop): it is complete."""
    log = runs.read_log(run_dir) if (run_dir / "log.jsonl").exists() else []
    return any("stop_reason" in e and e["stop_reason"] for e in log)


def train_stage(model, dataset: str, run_dir: Path, *, reuse: bool, train_kw: dict) -> Training:
    """Train `model` on `dataset` into `run_dir`, resuming from its checkpoints if it has some; with
    `reuse`, a run that has checkpoints is taken as it is."""
    from .train import train

    t0 = time.perf_counter()
    ckpt = run_dir / "checkpoints"
    has_ckpt = ckpt.is_dir() and any(ckpt.iterdir())
    if has_ckpt and reuse:
        # the run's own summary (its last stop event), so a re-run benchmark reports the training as the first did
        stops = [e for e in runs.read_log(run_dir) if e.get("event") == "stop"]
        summary = {k: v for k, v in (stops[-1] if stops else {}).items()
                   if k not in ("event", "time") and isinstance(v, (int, float, str, bool, type(None)))}
        summary.update(reused=True, run_dir=str(run_dir))
    else:
        summary = train(model, dataset, out=run_dir, resume=has_ckpt, **train_kw)
        summary = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, type(None)))}
        summary["reused"] = False
    log = runs.read_log(run_dir)
    epochs = [e for e in log if e.get("event") == "epoch" and "epoch_time_s" in e]
    times = [e["epoch_time_s"] for e in epochs[1:]] or [e["epoch_time_s"] for e in epochs]  # first epoch compiles
    summary["epochs"] = len(epochs)
    summary["time_per_epoch_min"] = float(np.median(times)) / 60.0 if times else None
    summary["wall_s"] = time.perf_counter() - t0
    info = runs.read_run(run_dir)
    card = info["card"]
    ds = info.get("dataset") or {}
    summary["n_train"], summary["n_val"] = ds.get("n_train"), ds.get("n_val")  # FaNE's tables are by training size
    return Training(summary, run_dir, card["name"], card.get("architecture"))


# --------------------------------------------------------------------------------------------------
# 2. evaluate
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Accuracy:
    metrics: dict[str, Any]  # jaxbench.evaluate's errors (meV, meV/Å, ...)
    frames: int | None
    parity_plot: str | None
    split: str = "test"

    def section(self) -> Section:
        return {"split": self.split, "frames": self.frames, **self.metrics, "parity_plot": self.parity_plot}


def best_checkpoint_sha256(run_dir: Path) -> str:
    """sha256 of the parameters the benchmark evaluates and simulates (the run's best checkpoint)."""
    _, meta = runs.find_checkpoint(run_dir, ("best", "best.prev", "last", "last.prev"), warn=False)
    return str(meta["sha256"])


def evaluate_stage(run_dir: Path, dataset: str, *, n_test: int | None, plots: bool, data_dir=None) -> Accuracy:
    """Energy and force errors of the run's best parameters on the test split (first `n_test` frames)."""
    from .evaluate import evaluate

    ev = evaluate(run_dir, dataset, "test", n_frames=n_test, plots=plots, data_dir=data_dir)
    return Accuracy(ev["metrics"], ev["metrics"].get("n_frames"), ev.get("plot"))


# --------------------------------------------------------------------------------------------------
# 3. simulate
# --------------------------------------------------------------------------------------------------
def resolve_protocol(protocol, dataset: str, *, replicas=None, steps=None, temperature=None, timestep=None):
    """The protocol card (name, YAML path or Protocol) with the given overrides, validated."""
    from . import md

    proto = protocol if isinstance(protocol, md.Protocol) else md.load_protocol(protocol, dataset)
    return proto.replace(replicas=replicas, steps=steps, temperature_K=temperature, timestep_fs=timestep).validate()


def replica_starts(frames, proto, ordered):
    """Replica starts. From a time-ordered split with replica_init 'frames', the starts are spread only
    over the frames that leave a whole ground-truth trajectory ahead of every replica (for EV / FV);
    when the split is just long enough for one, every replica starts at its first frame (distinct
    velocity seeds), as EGraFFBench's MD17 runs must have."""
    from . import md

    if proto.replica_init == "fes_minima":
        return fes_minima_starts(frames, proto)
    if not (ordered and proto.replica_init == "frames" and proto.frame_split == ordered["split"]):
        return md.start_from_frames(frames, proto.replicas, mode=proto.replica_init)
    needed = int(math.ceil(proto.steps * proto.timestep_fs / float(ordered["frame_interval_fs"])))
    last = max(0, len(frames) - 1 - needed)
    idx = np.linspace(0, last, proto.replicas).round().astype(int).tolist()
    f0 = frames.frame(idx[0])
    pos = np.stack([frames.frame(i)["positions"] for i in idx])
    return dataclasses.replace(md.Start.make(pos, f0["numbers"], f0["cell"], f0["pbc"]), frame_indices=tuple(idx))


def fes_minima_starts(frames, proto):
    """FaNE's starts: the frames of the split nearest the local minima of the split's own free-energy
    surface in the protocol's CVs (kernel estimate, :func:`jaxbench.fane.sampled_fes`), deepest first;
    more replicas than minima cycle through them."""
    import jax
    import jax.numpy as jnp

    from . import fane, md
    from .metadynamics import dihedral_cv

    n = np.asarray(frames.n_atoms)
    pos = np.asarray(frames.positions).reshape(len(n), int(n[0]), 3)
    cv = np.asarray(jax.vmap(dihedral_cv(*proto.metadynamics.dihedrals))(jnp.asarray(pos)))
    if cv.shape[1] != 2:
        raise ValueError(f"replica_init 'fes_minima' needs two CVs, the protocol has {cv.shape[1]}")
    grid = np.linspace(-np.pi, np.pi, 73)
    minima = fane.local_minima(fane.sampled_fes(cv[:, 0], cv[:, 1], proto.kT, grid), grid, n=proto.replicas)
    idx = fane.frames_near(cv[:, 0], cv[:, 1], minima)
    idx = [idx[r % len(idx)] for r in range(proto.replicas)]
    f0 = frames.frame(idx[0])
    start = md.Start.make(pos[idx], f0["numbers"], f0["cell"], f0["pbc"])
    return dataclasses.replace(start, frame_indices=tuple(idx))


@dataclasses.dataclass(frozen=True)
class Reference:
    """What the model's rollout is scored against."""

    positions: np.ndarray | None  # [T, N, 3] structure reference frames; None: none with the simulated atoms
    cells: np.ndarray | None  # [T, 3, 3]
    name: str | None  # what the frames are; None: there are none (no oracle, no frames at this temperature)
    trajectory: dict | None  # the oracle's rollout from the same start (EV / FV, diffusivity), if an oracle was given


@dataclasses.dataclass(frozen=True)
class Simulation:
    section: Section  # results["simulation"]
    start: Any  # jaxbench.md.Start
    periodic: bool
    trajectory: dict  # the model's rollout (jaxbench.trajectory.read)
    reference: Reference
    rdf_hook: Any | None  # FaNE eq. 8 inside the MD engine, when it could run
    rdf_window: int | str | None  # its window in frames, or why there is none (periodic systems only)
    rdf_failed: np.ndarray  # [R] bool: replicas the RDF criterion stopped
    rdf_reference: tuple | None  # (positions, cells) the criterion's reference g(r) came from
    first_unstable_frame: np.ndarray  # [R] frame of the MD failure, frames_saved for a stable replica
    frames_of_dynamics: np.ndarray  # [R] frames that are real dynamics (EV / FV run over these)
    frames_saved: int
    frame_interval_fs: float
    simulated_time_fs: float


def _reference(start, oracle, oracle_name, reference_split, dataset, proto, *, seed, out, progress, data_dir):
    """The oracle's rollout (pooled replicas) or the dataset's frames at the protocol's temperature."""
    from . import md, trajectory
    from .oracle import is_ase_calculator

    n_atoms = start.n_atoms
    if oracle is not None and not is_ase_calculator(oracle):
        ref = md.simulate(oracle, start, proto, seed=seed, out=out / "reference.h5", overwrite=True, resume=True,
                          progress=progress)
        ref_traj = trajectory.read(ref.path)
        ref_pos = np.asarray(ref_traj["position"]).reshape(-1, n_atoms, 3)
        ref_cells = np.broadcast_to(np.asarray(ref_traj["cell"]), (len(ref_pos), 3, 3))
        return Reference(ref_pos, ref_cells, f"oracle '{oracle_name}' rollout, all replicas", ref_traj)
    if reference_split is not None:  # an ASE oracle's rollout follows the model's (from its initial state)
        ref_pos, ref_cells = reference_frames(dataset, reference_split, n_atoms, data_dir)
        return Reference(ref_pos, ref_cells, f"dataset '{dataset}' split '{reference_split}'", None)
    return Reference(None, None, None, None)


def _ase_oracle_reference(oracle, oracle_name, traj, proto, seed: int, before: Reference) -> Reference:
    """An ASE-calculator oracle (OpenMM, EMT) rolled out with ASE's integrator from the model run's initial
    positions and velocities; its frames become the structure reference (the dataset split, if any, was
    only the RDF criterion's reference during the model's run)."""
    from .oracle import reference_rollout

    ref_traj = reference_rollout(oracle, traj, protocol=proto, seed=seed)
    n_atoms = ref_traj["position"].shape[2]
    ref_pos = np.asarray(ref_traj["position"]).reshape(-1, n_atoms, 3)
    ok = np.all(np.isfinite(ref_pos), axis=(1, 2))
    ref_cells = np.broadcast_to(np.asarray(ref_traj["cell"]), (len(ref_pos), 3, 3))
    name = f"oracle '{oracle_name}' rollout (ASE integrator), all replicas"
    return Reference(ref_pos[ok], ref_cells[ok], name, ref_traj) if ok.any() else before


def _simulation_section(sim, proto, start, n_saved: int) -> Section:
    from . import md
    from . import metrics as M

    n_atoms = start.n_atoms
    timings = sim.timings
    # steady state: the first chunk compiles, so the speed is taken over the chunks after it
    steady = timings.get("chunks_s")
    steady_steps = sim.steps_done - proto.chunk_steps if steady else None
    spd = M.speed(n_atoms * proto.replicas, steady_steps, steady, proto.timestep_fs) if steady and steady_steps else \
        M.speed(n_atoms * proto.replicas, sim.steps_done, timings["total_s"], proto.timestep_fs)
    return {
        "trajectory": str(sim.path), "replicas": proto.replicas, "devices": int(sim.devices), "steps": int(sim.steps_done),
        "atoms": int(n_atoms),
        "frames_saved": int(n_saved), "frame_interval_fs": proto.timestep_fs * proto.save_every,
        "start_frames": list(start.frame_indices or []),
        "failed": [bool(x) for x in sim.failed], "failure_time_fs": [None if not np.isfinite(x) else float(x)
                                                                    for x in sim.failure_time_fs],
        "failure_reason": [md.describe_failure(int(x)) if f else None for x, f in zip(sim.failure_reason, sim.failed)],
        "stable_fraction": float(np.mean(~np.asarray(sim.failed))),
        "timings_s": {k: float(v) for k, v in timings.items()},
        "inference_time_min": float(timings["total_s"]) / 60.0,
        "speed": {"atom_steps_per_s": spd.atom_steps_per_s, "ns_per_day": spd.ns_per_day,
                  "us_per_step_atom": spd.us_per_step_atom,
                  # FaNE's FPS: MD steps per second; all replicas advance together, one step each
                  "steps_per_s": spd.atom_steps_per_s / (n_atoms * proto.replicas),
                  "note": "steady state (chunks after the first, all replicas' atoms)" if steady else "including compile"},
    }


def simulate_stage(run_dir: Path, spec, proto, *, oracle=None, oracle_name: str | None = None,
                   reference_split: str | None, settings: BenchSettings, seed: int, out: Path,
                   progress: bool = True, data_dir=None) -> Simulation:
    """Roll out the run's best model with `proto` from the dataset's frames (out/trajectory.h5), after the
    oracle's rollout from the same start (out/reference.h5) when an oracle is given."""
    from . import data, md, trajectory

    dataset = spec.name
    pot, params = runs.load_potential(run_dir, "best")
    frames = data.load(dataset, proto.frame_split, data_dir=data_dir)
    start = replica_starts(frames, proto, spec.trajectory)
    periodic = bool(np.any(start.pbc))
    # the reference comes first: the RDF stability criterion runs inside the model's rollout
    ref = _reference(start, oracle, oracle_name, reference_split, dataset, proto, seed=seed, out=out,
                     progress=progress, data_dir=data_dir)
    hook, rdf_window = None, None
    if periodic:
        if ref.positions is None:
            rdf_window = "no reference RDF: " + (f"the reference frames ({ref.name}) do not all have the simulated atoms"
                                                  if ref.name else "no reference frames and no oracle")
        else:
            hook, rdf_window = rdf_failure_hook(start, ref.positions, ref.cells, proto, settings)
    rdf_reference = (ref.positions, ref.cells) if hook is not None else None
    sim = md.simulate(pot, start, proto, params=params, seed=seed, out=out / "trajectory.h5", overwrite=True, resume=True,
                      progress=progress, failure_fn=hook)
    traj = trajectory.read(sim.path)
    if oracle is not None and ref.trajectory is None and proto.metadynamics is None:
        ref = _ase_oracle_reference(oracle, oracle_name, traj, proto, seed, ref)
    n_saved = len(traj["step"])
    fail_frames = np.where(sim.failure_step >= 0, np.ceil(sim.failure_step / proto.save_every).astype(int), n_saved)
    fail_frames = np.minimum(fail_frames, n_saved)
    rdf_failed = (np.asarray(sim.failure_reason) & 8) != 0 if hook is not None else np.zeros(len(fail_frames), bool)
    # EV / FV run to the MD failure, as EGraFFBench's; an RDF failure is dated at the start of its window
    # but the frames up to the window's end are real dynamics
    dynamics_frames = np.where(rdf_failed, np.minimum(fail_frames + (rdf_window if hook is not None else 0), n_saved),
                               fail_frames)
    return Simulation(
        section=_simulation_section(sim, proto, start, n_saved), start=start, periodic=periodic, trajectory=traj,
        reference=ref, rdf_hook=hook, rdf_window=rdf_window, rdf_failed=rdf_failed, rdf_reference=rdf_reference,
        first_unstable_frame=fail_frames, frames_of_dynamics=dynamics_frames, frames_saved=n_saved,
        frame_interval_fs=proto.timestep_fs * proto.save_every, simulated_time_fs=sim.steps_done * proto.timestep_fs,
    )


def trajectories_sha256(out: Path) -> dict[str, str]:
    """A digest of every trajectory (H5MD file) in a bench directory: what the scores are computed from.
    Of the committed frames and the failure flags, not of the file's bytes (a resumed, finished run
    rewrites its attributes without changing a frame)."""
    import hashlib

    from .trajectory import read

    digests = {}
    for p in sorted(Path(out).glob("*.h5")):
        tr, h = read(p), hashlib.sha256()
        for k in sorted(tr):
            if isinstance(tr[k], np.ndarray):
                h.update(k.encode())
                h.update(np.ascontiguousarray(tr[k]).tobytes())
        info = tr["info"]
        for k in ("failed", "failure_step", "failure_reason", "steps_done", "frames_committed", "complete"):
            h.update(f"{k}={np.asarray(info.get(k)).tolist()}".encode())
        digests[p.name] = h.hexdigest()
    return digests


def plots_present(out: Path, plots) -> bool:
    """Whether an earlier run's plot section names files that are all still there."""
    if not isinstance(plots, dict) or not plots:
        return False
    files = [v for v in plots.values() if isinstance(v, str)]
    return all((Path(out) / f).is_file() or Path(f).is_file() for f in files)


# --------------------------------------------------------------------------------------------------
# 4. score
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StructureScore:
    section: Section  # results["structure"]
    arrays: dict | None  # r, g_ref, g_model per replica (for the plot); None when not computed


def score_structure(sim: Simulation, dataset: str, proto, settings: BenchSettings) -> StructureScore:
    """g(r) (periodic, all images) / h(r) (molecules) of each replica's stable part vs the reference."""
    ref, traj = sim.reference, sim.trajectory
    if ref.name is None:
        return StructureScore(na(f"dataset '{dataset}' has no reference frames at {proto.temperature_K:g} K and no "
                                 "oracle was given"), None)
    if ref.positions is None:
        return StructureScore(na(f"the reference frames ({ref.name}) do not all have the simulated atoms"), None)
    try:
        st, arrays = structure_vs_reference(traj, ref.positions, ref.cells, np.asarray(traj["pbc"]),
                                            np.asarray(traj["species"]), sim.first_unstable_frame, settings,
                                            sim.periodic)
    except ValueError as e:
        return StructureScore(na(str(e)), None)
    st["reference"] = ref.name
    return StructureScore(st, arrays)


def score_stability(sim: Simulation, proto, settings: BenchSettings) -> Section:
    """Time to failure of each replica: MD failures (the RDF criterion is one of them for periodic systems)."""
    fail_frames, dt_frame = sim.first_unstable_frame, sim.frame_interval_fs
    stab = {"md_failures": sim.section["failure_time_fs"],
            "criterion_in_md": "NaN / temperature bounds" + ("" if sim.periodic else
                                                               f", bond length (> 0.5 Å, bonds at {proto.bond_factor} x covalent radii)")}
    if sim.periodic:
        if sim.rdf_hook is None:
            stab["rdf"] = na(sim.rdf_window)
        else:
            which = "every element pair" if settings.rdf_stability_pairs else "total g(r)"
            stab["criterion_in_md"] += (f", RDF (FaNE eq. 8, {which}: {settings.rdf_stability_window_fs:g} fs window, "
                                        f"Delta {settings.rdf_stability_threshold})")
            stab["rdf"] = {"criterion": f"FaNE eq. 8: window {settings.rdf_stability_window_fs:g} fs ({sim.rdf_window} frames), "
                                        f"Delta {settings.rdf_stability_threshold}, evaluated inside the MD engine",
                           "failed": [bool(x) for x in sim.rdf_failed],
                           "first_unstable_frame": [int(f) for f in fail_frames],
                           "stable_time_fs": [min(float(f) * dt_frame, sim.simulated_time_fs) for f in fail_frames]}
            if settings.rdf_stability_pairs:
                traj = sim.trajectory
                stab["rdf"].update(rdf_window_deviation(
                    np.asarray(traj["position"]), np.asarray(traj["cell"]), np.asarray(traj["pbc"]),
                    np.asarray(traj["species"]), *sim.rdf_reference, fail_frames, sim.rdf_failed, sim.rdf_window,
                    settings))
    stab["stable_time_fs"] = replica_stats([min(float(f) * dt_frame, sim.simulated_time_fs) for f in fail_frames])
    stab["simulated_time_fs"] = sim.simulated_time_fs
    return stab


def score_violations(sim: Simulation, dataset: str, ordered, proto, data_dir=None) -> Section:
    """EV / FV against the oracle's rollout, else against a time-ordered split (``ordered``: the data
    card's ``trajectory:``), else not applicable."""
    traj, ref_traj = sim.trajectory, sim.reference.trajectory
    e_model, f_model = np.asarray(traj["potential_energy"]), np.asarray(traj["force"])
    if ref_traj is not None:
        n_valid = np.minimum(sim.frames_of_dynamics, sim.frames_saved)
        return energy_force_violations(e_model, f_model, np.asarray(ref_traj["potential_energy"]),
                                       np.asarray(ref_traj["force"]), n_valid, sim.reference.name)
    if ordered and proto.frame_split == ordered["split"]:
        return violations_vs_split(dataset, ordered, sim.start, proto, e_model, f_model, sim.frames_of_dynamics, data_dir)
    reason = (f"no ground-truth trajectory: dataset '{dataset}' has no time-ordered split (its card has no "
              "`trajectory:`) and no oracle was given" if not ordered else
              f"replicas start from split '{proto.frame_split}', the time-ordered split is '{ordered['split']}'")
    return na(reason)


def score_oracle_on_model_frames(sim: Simulation, oracle, oracle_name: str | None) -> Section:
    """The model against the oracle on the model's own frames: EV / FV and the force MAE."""
    traj = sim.trajectory
    e_model, f_model = np.asarray(traj["potential_energy"]), np.asarray(traj["force"])
    n_valid = np.minimum(sim.frames_of_dynamics, sim.frames_saved)
    e_or, f_or = oracle_on_frames(oracle, traj)
    out = energy_force_violations(e_model, f_model, e_or, f_or, n_valid, f"oracle '{oracle_name}' on the model's frames")
    out["force_mae_meV_A"] = replica_stats([
        float(np.abs(f_model[r, : n_valid[r]] - f_or[r, : n_valid[r]]).mean() * 1000) if n_valid[r] else None
        for r in range(len(n_valid))])
    return out


@dataclasses.dataclass(frozen=True)
class FreeEnergyScore:
    section: Section  # results["free_energy"]
    arrays: dict | None  # grid_rad, reference_fes_eV, model_fes_eV [R or None] (for the plot)


def score_free_energy(start, trajectory: dict, failed, spec, proto, *, seed: int, out: Path,
                      first_unstable_frame=None) -> FreeEnergyScore:
    """FaNE Table 5: F(phi), F(psi) of each finished replica's metadynamics (from its hills) against the
    reference engine's metadynamics with the same bias from the same start (OpenMM ``app.Metadynamics``),
    MAE in kJ/mol; the reference surfaces are saved in out/reference_fes.npz. ``start``: the rollout's
    :class:`jaxbench.md.Start`, ``trajectory``: its frames and hills (:func:`jaxbench.trajectory.read`),
    ``failed`` [R]: replicas that did not finish (they get no score; the (phi, psi) they visited before
    ``first_unstable_frame`` [R] go to the plot)."""
    from . import fane
    from .metadynamics import Hills
    from .md.bias import metadynamics_of

    if proto.metadynamics is None:
        return FreeEnergyScore(na("the protocol has no metadynamics"), None)
    m = proto.metadynamics
    generator = (spec.generated or {}).get("generator")
    if generator != "alanine-dipeptide":
        return FreeEnergyScore(na(f"no reference metadynamics engine for dataset '{spec.name}' (only the OpenMM "
                                  "alanine-dipeptide system has one)"), None)
    from .generate.openmm_metad import PHI, PSI, reference_metadynamics

    if tuple(map(tuple, m.dihedrals)) != (PHI, PSI) or m.bias_factor is None:
        return FreeEnergyScore(na("the reference metadynamics is well-tempered on (phi, psi) = "
                                  f"{[list(PHI), list(PSI)]}; the protocol differs"), None)
    meta = metadynamics_of(proto, start.n_atoms)
    grid = np.linspace(-np.pi, np.pi, 72)  # OpenMM's grid: its last point is -pi's periodic image
    kT = proto.kT
    ref_fes, ref_seconds, engine = [], 0.0, None
    for r in range(start.n_replicas):
        t0 = time.perf_counter()
        kw = dict(temperature_K=proto.temperature_K, timestep_fs=proto.timestep_fs, height_kJ_mol=m.height_kJ_mol,
                  sigma_rad=m.sigma_rad, pace_steps=m.pace_steps(proto), bias_factor=m.bias_factor,
                  friction_per_ps=proto.friction_per_fs * 1000.0, seed=seed + r, grid=len(grid))
        fes, engine_r = _cached_reference_fes(out / "reference_fes_parts" / f"replica_{r:03d}.npz", start.positions[r],
                                              proto.steps, kw, reference_metadynamics)
        engine = engine or engine_r
        ref_seconds += time.perf_counter() - t0
        ref_fes.append(fes)
    ref_mean = np.mean(ref_fes, axis=0)
    ref_mean -= ref_mean.min()
    h = trajectory["hills"]
    failed = np.asarray(failed, bool)
    model_fes, per = [], {"F(phi)": [], "F(psi)": []}
    for r in range(len(failed)):
        if failed[r]:
            model_fes.append(None)
            for k in per:
                per[k].append(None)
            continue
        hills = Hills(h["centers"][r], h["heights"][r], np.int32(h["count"][r]), np.bool_(False))
        f = fane.fes_grid(meta, hills, grid)
        model_fes.append(f)
        for k, v in fane.fes_scores(f, ref_mean, grid, kT).items():
            per[k].append(v["mae_kJ_mol"])
    np.savez(out / "reference_fes.npz", grid_rad=grid, fes_eV=np.asarray(ref_fes), mean_fes_eV=ref_mean)
    section = {
        "reference": f"OpenMM app.Metadynamics, same bias and start per replica ({engine}), "
                     "replicas' surfaces averaged",
        "reference_seconds": ref_seconds, "finished_runs": int((~failed).sum()), "runs": int(len(failed)),
        "hills_per_replica": [int(c) for c in h["count"]],
        "mae_kJ_mol": {k: replica_stats(v) for k, v in per.items()},
        "units": {"mae_kJ_mol": "kJ/mol, FaNE eq. 6-7 (integral of |F - F_ref| over [-pi, pi) / 2 pi)"},
        "bond_stability": f"bond length (Delta {0.5} Å) inside the MD engine, bonds at {proto.bond_factor} x covalent radii",
    }
    return FreeEnergyScore(section, dict(grid_rad=grid, reference_fes_eV=ref_mean, model_fes_eV=model_fes,
                                         model_cv_rad=_visited_cvs(trajectory, proto, failed, first_unstable_frame)))


def _cached_reference_fes(path: Path, positions, steps: int, kw: dict, compute) -> tuple[np.ndarray, str]:
    """One replica's reference F(phi), F(psi) (an OpenMM run of up to hours for FaNE's 5 ns), kept in
    ``path`` once computed: a re-run benchmark (after an interruption) reuses it when nothing it depends on
    changed. Returns (fes_eV, engine)."""
    import json
    import os

    key = json.dumps(dict(kw, steps=int(steps), positions=np.asarray(positions, np.float64).round(12).tolist()),
                     sort_keys=True)
    if path.is_file():
        try:
            with np.load(path) as z:
                if str(z["key"]) == key:
                    return np.asarray(z["fes_eV"]), str(z["engine"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable or from another run: computed again
    ref = compute(positions, steps, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, key=np.array(key), fes_eV=ref["fes_eV"], engine=np.array(ref["settings"]["engine"]))
    os.replace(tmp, path)
    return ref["fes_eV"], ref["settings"]["engine"]


def _visited_cvs(trajectory: dict, proto, failed, first_unstable_frame) -> np.ndarray | None:
    """(phi, psi) of the frames the failed replicas saved before their failure [M, 2] (for the plot)."""
    import jax

    from .metadynamics import dihedral_cv

    pos = trajectory.get("position")
    if pos is None or not np.any(failed):
        return None
    first_bad = first_unstable_frame
    cv_fn = jax.vmap(dihedral_cv(*proto.metadynamics.dihedrals))
    out = []
    for r in np.flatnonzero(failed):
        p = np.asarray(pos[r])
        stop = int(first_bad[r]) if first_bad is not None and int(first_bad[r]) >= 0 else len(p)
        if stop > 0:
            out.append(np.asarray(cv_fn(p[:stop])))
    return np.concatenate(out) if out else None


def score_dynamics(sim: Simulation, spec, settings: BenchSettings) -> Section:
    """Diffusivity per element on each replica's stable part (periodic systems), beside the reference's."""
    if not sim.periodic:
        return na("diffusivity is computed for periodic systems")
    traj, ref_traj, dt_frame = sim.trajectory, sim.reference.trajectory, sim.frame_interval_fs
    species = np.asarray(traj["species"])
    dyn = {"diffusivity_cm2_s": diffusivity_per_element(traj, sim.first_unstable_frame, dt_frame, settings, species),
           "window": (f"{settings.msd_window_fs:g} fs windows over replicas stable for at least "
                      f"{settings.msd_min_stable_fs or 0:g} fs" if settings.msd_window_fs is not None else
                      f"{settings.msd_window_fraction:g} of the stable frames")
           + f", after {settings.msd_equilibration_fraction:g} equilibration"}
    if ref_traj is not None:
        dyn["reference_diffusivity_cm2_s"] = diffusivity_per_element(
            ref_traj, np.full(len(ref_traj["position"]), len(ref_traj["step"])), dt_frame, settings, species)
    elif reference_observables(spec).get("diffusivity_cm2_s"):
        dyn["reference_diffusivity_cm2_s"] = reference_observables(spec)["diffusivity_cm2_s"]
    else:
        dyn["reference_diffusivity_cm2_s"] = na("the reference frames are not a trajectory (no oracle; "
                                                "LiPS frames are shuffled)" if not spec.trajectory else
                                                "not computed from the dataset split")
    return dyn


# --------------------------------------------------------------------------------------------------
# 5. plots
# --------------------------------------------------------------------------------------------------
def plot_stage(out: Path, results: dict, sim: Simulation, structure: StructureScore,
               free_energy: FreeEnergyScore | None = None, kT: float | None = None) -> dict[str, str]:
    """RDF / h(r) overlay, EV and FV against time, temperature and energy traces, MSD, and the
    Ramachandran plot under metadynamics: {name: png path}."""
    from .plots import bench_figures

    paths = bench_figures(out, results, sim.trajectory, sim.reference.trajectory, structure.arrays)
    if free_energy is not None and free_energy.arrays is not None:
        from .fane import ramachandran_plot

        a = free_energy.arrays
        done = [f for f in a["model_fes_eV"] if f is not None]
        model = np.mean(done, axis=0) if done else None
        fe = results.get("free_energy") or {}
        note = "" if done else f"none of {fe.get('runs', len(a['model_fes_eV']))} runs finished"
        paths["ramachandran"] = ramachandran_plot(out / "ramachandran.png", a["grid_rad"], a["reference_fes_eV"],
                                                  None if model is None else model - model.min(), kT,
                                                  model_name=results.get("model") or "model",
                                                  ref_name="OpenMM metadynamics", model_cv_rad=a.get("model_cv_rad"),
                                                  note=note)
    return paths
