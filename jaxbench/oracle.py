"""Reference oracle for the energy and force violation metrics (EGraFFBench eq. 4).

An *oracle* is the ground truth a model trajectory is judged against: any ASE calculator (DFT, a
classical potential, a PyTorch model behind an ASE calculator) or any JAX energy model accepted by
:func:`jaxbench.md.as_energy_model` (a ``Potential`` with params, an ``EnergyModel``, ``fn(graph)``).

Two things are computed:

* :func:`evaluate_frames`: reference energy and forces on the saved frames of a model trajectory
  (an H5MD file written by :func:`jaxbench.md.simulate`, an ``MDResult``, or the dict
  :func:`jaxbench.trajectory.read` returns). For a JAX oracle the frames are evaluated in fixed-size
  blocks by one jitted function (neighbor list rebuilt per frame inside it), for an ASE calculator
  frame by frame.
* :func:`reference_rollout`: a rollout of the oracle itself from the model trajectory's initial state
  (same positions, same velocities, same protocol). A JAX oracle runs through
  :func:`jaxbench.md.simulate` (same seed, so even Langevin noise is the same stream); an ASE
  calculator runs ASE's ``VelocityVerlet`` (nve), ``Langevin`` (nvt_langevin) or
  ``NoseHooverChainNVT`` (nvt_nose_hoover, same chain length and coupling time).

Both return arrays shaped like the trajectory: ``energy`` / ``potential_energy`` [R, T] eV and
``forces`` / ``force`` [R, T, N, 3] eV/Å, which :func:`violations` feeds to
:func:`jaxbench.metrics.energy_violation` and :func:`jaxbench.metrics.force_violation`.

Units as in :mod:`jaxbench.md`: Å, eV, amu, fs, K; velocities Å/fs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from .errors import JaxbenchError

__all__ = ["is_ase_calculator", "evaluate_frames", "reference_rollout", "violations", "load_trajectory"]


def is_ase_calculator(obj) -> bool:
    """True for ASE calculators (anything with ``get_potential_energy`` and ``get_forces``)."""
    try:
        from ase.calculators.calculator import BaseCalculator

        if isinstance(obj, BaseCalculator):
            return True
    except ImportError:  # pragma: no cover - ase is a dependency
        pass
    return hasattr(obj, "get_potential_energy") and hasattr(obj, "get_forces") and not callable(obj)


def load_trajectory(trajectory) -> dict[str, Any]:
    """A model trajectory as the dict :func:`jaxbench.trajectory.read` returns, from an H5MD path,
    an ``MDResult`` (its in-memory arrays, else its file) or such a dict (returned as is)."""
    from .md import MDResult
    from .trajectory import read

    if isinstance(trajectory, dict):
        missing = [k for k in ("position", "species", "cell", "pbc", "step") if k not in trajectory]
        if missing:
            raise JaxbenchError(f"trajectory dict lacks {missing} (expected what jaxbench.trajectory.read returns)")
        return trajectory
    if isinstance(trajectory, MDResult):
        if trajectory.arrays is not None:
            tr = dict(trajectory.arrays)
            tr.setdefault("info", {"protocol": trajectory.protocol.to_dict(), "seed": int(trajectory.seed)})
            return tr
        if trajectory.path is None:
            raise JaxbenchError("MDResult has neither arrays nor a trajectory file (run simulate with keep_arrays or out)")
        return read(trajectory.path)
    p = Path(trajectory)
    if not p.is_file():
        raise JaxbenchError(f"trajectory file {p} does not exist")
    return read(p)


# --------------------------------------------------------------------------------------------------
# reference labels on saved frames
# --------------------------------------------------------------------------------------------------


def _jax_frame_fn(model, numbers, cell, pbc, multiplier, block):
    """Jitted ``f(params, positions[B, N, 3], template) -> (energy [B], forces [B, N, 3], overflow [B])``:
    per frame a fresh neighbor list (rebuilt from ``template``'s capacity) and energy + forces.

    Cached with the engine's cache, so repeated evaluations of one system reuse the compiled code."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from .graph import md_graph
    from .md.engine import cached, neighbor_fns, system_key

    n = len(numbers)
    # skin 0: the list holds exactly the pairs within the cutoff of this frame (rebuilt every frame)
    nl, _ = neighbor_fns(cell, pbc, model.cutoff, 0.0, multiplier, n)

    def make():
        def energy(p, x, nbrs):
            return model.fn(p, md_graph(x, numbers, cell, pbc, nbrs))

        def one(params, x, template):
            nbrs = nl.update(x, template)
            e, g = jax.value_and_grad(energy, argnums=1)(params, x, nbrs)
            return e, -g, nbrs.did_overflow

        def f(params, positions, template):
            return lax.map(lambda x: one(params, x, template), positions)

        return nl, jax.jit(f)

    key = ("oracle_frames", model.key, np.asarray(numbers).tobytes(), block) + system_key(cell, pbc, model.cutoff, 0.0, multiplier)
    return cached(key, make)


def _evaluate_jax(model, positions, numbers, cell, pbc, block: int, capacity_multiplier: float):
    import jax
    import jax.numpy as jnp

    from .md.engine import require_x64

    require_x64()
    params = jax.tree.map(jnp.asarray, model.params)
    F = len(positions)
    energies = np.empty(F)
    forces = np.empty(positions.shape)
    mult = float(capacity_multiplier)
    for s in range(0, F, block):
        chunk = positions[s : s + block]
        b = len(chunk)
        if b < block:  # pad with the last frame: one compiled shape for every block
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], block - b, axis=0)])
        for _ in range(8):
            nl, fn = _jax_frame_fn(model, numbers, cell, pbc, mult, block)
            # capacity from the block's first frame (host-side allocate, once per block); a denser
            # frame later in the block shows up as overflow and the block is redone with more room
            template = nl.allocate(chunk[0])
            template = dataclasses.replace(template, reference_positions=jnp.full_like(template.reference_positions, jnp.inf))
            e, f, overflow = fn(params, jnp.asarray(chunk), template)
            if not bool(np.any(np.asarray(overflow))):
                break
            mult *= 1.5  # a frame of the block has more pairs than the first one: more room, redo
        else:
            raise JaxbenchError(f"oracle neighbor list still overflows at capacity_multiplier {mult:.3g} (frames {s}..{s + b - 1})")
        energies[s : s + b] = np.asarray(e)[:b]
        forces[s : s + b] = np.asarray(f)[:b]
    return energies, forces


def _atoms(numbers, positions, cell, pbc, masses=None):
    import ase

    atoms = ase.Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    if masses is not None:
        atoms.set_masses(masses)
    return atoms


def _evaluate_ase(calc, positions, numbers, cell, pbc):
    F = len(positions)
    energies = np.empty(F)
    forces = np.empty(positions.shape)
    for t in range(F):
        atoms = _atoms(numbers, positions[t], cell, pbc)
        atoms.calc = calc
        energies[t] = atoms.get_potential_energy()
        forces[t] = atoms.get_forces()
    return energies, forces


def evaluate_frames(
    oracle,
    trajectory,
    params=None,
    cutoff: float | None = None,
    replicas=None,
    every: int = 1,
    block: int = 32,
    capacity_multiplier: float = 1.5,
) -> dict[str, np.ndarray]:
    """Reference energy and forces on the saved frames of a model trajectory.

    Args:
      oracle: an ASE calculator, or a JAX energy model (``Potential`` + ``params``, ``EnergyModel``,
        ``fn(graph)`` + ``cutoff``; see :func:`jaxbench.md.as_energy_model`).
      trajectory: H5MD path, ``MDResult`` or :func:`jaxbench.trajectory.read` dict.
      replicas: indices of the replicas to evaluate (default all); every: take every k-th frame.
      block: frames per jitted call (JAX oracles; the last block is padded to this size).

    Returns a dict: ``energy`` [R, T] eV, ``forces`` [R, T, N, 3] eV/Å (the reference labels),
    ``model_energy`` [R, T] and ``model_forces`` [R, T, N, 3] (the trajectory's own values on the same
    frames, when saved), ``step`` [T], ``time`` [T] fs.
    """
    tr = load_trajectory(trajectory)
    if int(every) < 1:
        raise JaxbenchError(f"every must be >= 1, got {every}")
    pos = np.asarray(tr["position"], np.float64)
    R = pos.shape[0]
    reps = list(range(R)) if replicas is None else [int(r) for r in np.atleast_1d(replicas)]
    bad = [r for r in reps if not 0 <= r < R]
    if bad:
        raise JaxbenchError(f"replicas {bad} not in the trajectory (it has {R})")
    frames = np.arange(0, pos.shape[1], int(every))
    pos = pos[reps][:, frames]
    numbers = np.asarray(tr["species"], np.int32)
    cell = np.asarray(tr["cell"], np.float64)
    pbc = np.asarray(tr["pbc"], bool)
    if not np.all(np.isfinite(pos)):
        r, t = np.argwhere(~np.isfinite(pos).all(axis=(2, 3)))[0]
        raise JaxbenchError(f"trajectory frame {frames[t]} of replica {reps[r]} has non-finite positions")
    flat = pos.reshape(-1, *pos.shape[2:])
    if is_ase_calculator(oracle):
        e, f = _evaluate_ase(oracle, flat, numbers, cell, pbc)
    else:
        from .md import as_energy_model

        model = as_energy_model(oracle, params=params, cutoff=cutoff)
        model.check(numbers, where="trajectory species")
        e, f = _evaluate_jax(model, flat, numbers, cell, pbc, int(block), capacity_multiplier)
    out = {
        "energy": e.reshape(len(reps), len(frames)),
        "forces": f.reshape(pos.shape),
        "step": np.asarray(tr["step"])[frames],
        "time": np.asarray(tr["time"])[frames] if "time" in tr else None,
    }
    if "potential_energy" in tr:
        out["model_energy"] = np.asarray(tr["potential_energy"])[reps][:, frames]
    if "force" in tr:
        out["model_forces"] = np.asarray(tr["force"])[reps][:, frames]
    return out


# --------------------------------------------------------------------------------------------------
# reference rollouts
# --------------------------------------------------------------------------------------------------


def _initial_state(tr, protocol):
    """Start (positions + velocities of frame 0 of each replica) and protocol of a model trajectory."""
    from .md import Protocol, Start

    if protocol is None:
        info = tr.get("info") or {}
        if "protocol" not in info:
            raise JaxbenchError("the trajectory records no protocol: pass protocol=")
        protocol = Protocol.from_dict(info["protocol"])
    if int(np.asarray(tr["step"])[0]) != 0:
        raise JaxbenchError(f"the trajectory's first saved frame is step {int(tr['step'][0])}, not the initial state (step 0)")
    if "velocity" not in tr:
        raise JaxbenchError("the trajectory has no velocities: the reference rollout needs the initial velocities")
    start = Start.make(
        np.asarray(tr["position"])[:, 0], tr["species"], tr["cell"], tr["pbc"], velocities=np.asarray(tr["velocity"])[:, 0]
    )
    return start, protocol.validate()


def _rollout_ase(calc, start, protocol, seed: int, masses=None):
    """One ASE MD run per replica; observables every ``save_every`` steps, as :func:`trajectory.read`."""
    import ase.units as u
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import NoseHooverChainNVT
    from ase.md.verlet import VelocityVerlet

    from .md import KB_EV_PER_K

    R, N = start.n_replicas, start.n_atoms
    every, steps = int(protocol.save_every), int(protocol.steps)
    T = steps // every + 1
    out = {k: np.full((R, T, N, 3), np.nan) for k in ("position", "velocity", "force")}
    out.update({k: np.full((R, T), np.nan) for k in ("potential_energy", "kinetic_energy", "conserved_energy", "temperature")})
    failed = np.zeros(R, bool)
    failure_step = np.full(R, -1, np.int64)
    dt = protocol.timestep_fs * u.fs
    for r in range(R):
        atoms = _atoms(start.numbers, start.positions[r], start.cell, start.pbc, masses)
        atoms.set_velocities(start.velocities[r] / u.fs)  # Å/fs -> Å / ASE time unit
        atoms.calc = calc
        if protocol.ensemble == "nve":
            dyn = VelocityVerlet(atoms, timestep=dt)
        elif protocol.ensemble == "nvt_langevin":
            # centre of mass held by a FixCom constraint (ASE >= 3.28: Langevin's own fixcm is deprecated
            # because it does not sample NVT exactly)
            from ase.constraints import FixCom

            atoms.set_constraint(FixCom())
            dyn = Langevin(atoms, timestep=dt, temperature_K=protocol.temperature_K,
                           friction=protocol.friction_per_fs / u.fs, fixcm=False, rng=np.random.default_rng([seed, r]))
        else:
            tau_fs = 100.0 * protocol.timestep_fs if protocol.tau_fs is None else protocol.tau_fs
            dyn = NoseHooverChainNVT(atoms, timestep=dt, temperature_K=protocol.temperature_K, tdamp=tau_fs * u.fs,
                                     tchain=int(protocol.chain_length))
        for t in range(T):
            if t:
                try:
                    dyn.run(every)
                except Exception as exc:  # noqa: BLE001 - a calculator failing mid-run is a failure result
                    failed[r], failure_step[r] = True, (t - 1) * every
                    atoms.info["oracle_error"] = repr(exc)
            x, v = atoms.get_positions(), atoms.get_velocities() * u.fs
            if not failed[r]:
                e, f = atoms.get_potential_energy(), atoms.get_forces()
                ke = atoms.get_kinetic_energy()
                ok = np.isfinite(e) and np.all(np.isfinite(f)) and np.all(np.isfinite(x)) and np.all(np.isfinite(v))
                if not ok:
                    failed[r], failure_step[r] = True, t * every
            if failed[r]:  # frozen at the last good frame, like a failed replica of simulate
                for k in out:
                    out[k][r, t] = out[k][r, t - 1] if t else np.nan
                continue
            out["position"][r, t], out["velocity"][r, t], out["force"][r, t] = x, v, f
            out["potential_energy"][r, t], out["kinetic_energy"][r, t] = e, ke
            # thermostat energy not tracked for ASE runs: PE + KE (conserved only for nve)
            out["conserved_energy"][r, t] = e + ke
            out["temperature"][r, t] = 2.0 * ke / (3 * N * KB_EV_PER_K)
    out["step"] = every * np.arange(T)
    out["time"] = out["step"] * protocol.timestep_fs
    out["failed"], out["failure_step"] = failed, failure_step
    return out


def reference_rollout(
    oracle,
    trajectory,
    params=None,
    cutoff: float | None = None,
    protocol=None,
    seed: int | None = None,
    out=None,
    overwrite: bool = False,
    batch: str = "map",
    progress: bool = False,
) -> dict[str, Any]:
    """Run the oracle from the model trajectory's initial state (positions and velocities of step 0 of
    every replica) with the same protocol (default: the one recorded in the trajectory).

    JAX oracles run through :func:`jaxbench.md.simulate` (``seed`` defaults to the trajectory's, so a
    Langevin reference sees the same noise stream; ``out`` writes an H5MD file). ASE calculators run
    ASE's integrator matching ``protocol.ensemble`` (Langevin noise from ``numpy`` seeded by
    ``(seed, replica)``: statistically, not step by step, comparable to the model run).

    Returns a dict like :func:`jaxbench.trajectory.read`: ``position``/``velocity``/``force``
    [R, T, N, 3], ``potential_energy``/``kinetic_energy``/``conserved_energy``/``temperature`` [R, T],
    ``step``, ``time``, plus ``failed`` [R] and ``failure_step`` [R] (-1: none).
    """
    tr = load_trajectory(trajectory)
    start, protocol = _initial_state(tr, protocol)
    if seed is None:
        seed = int((tr.get("info") or {}).get("seed", 0))
    if is_ase_calculator(oracle):
        res = _rollout_ase(oracle, start, protocol, int(seed), masses=tr.get("mass"))
        res.update(species=start.numbers, cell=start.cell, pbc=start.pbc)
        if tr.get("mass") is not None:
            res["mass"] = np.asarray(tr["mass"])
        return res
    from .md import simulate

    res = simulate(oracle, start, protocol, params=params, cutoff=cutoff, seed=int(seed), out=out, overwrite=overwrite,
                   keep_arrays=True, batch=batch, progress=progress)
    a = dict(res.arrays)
    a["failed"], a["failure_step"] = res.failed, res.failure_step
    return a


# --------------------------------------------------------------------------------------------------
# violations
# --------------------------------------------------------------------------------------------------


def violations(model, reference=None, eps: float = 0.0) -> dict[str, Any]:
    """EV(t) and FV(t) (EGraFFBench eq. 4) [R, T] and their summaries (geometric mean over time, then
    mean / std over replicas).

    ``model`` and ``reference`` are dicts with ``potential_energy`` (or ``energy``) [R, T] and
    ``force`` (or ``forces``) [R, T, N, 3] on the same frames: e.g. a model trajectory and
    :func:`evaluate_frames` of it (labels on the model's frames), or a model trajectory and a
    :func:`reference_rollout` (the paper's comparison of two rollouts at equal times). With
    ``reference`` omitted, ``model`` is an :func:`evaluate_frames` result (its ``model_energy`` /
    ``model_forces`` against its ``energy`` / ``forces``).
    """
    from . import metrics

    if reference is None:
        if "model_energy" not in model or "model_forces" not in model:
            raise JaxbenchError("violations(labels) needs an evaluate_frames result with model_energy and model_forces")
        reference = model
        model = {"potential_energy": model["model_energy"], "force": model["model_forces"]}

    def get(d, *names):
        for n in names:
            if n in d and d[n] is not None:
                return np.asarray(d[n])
        raise JaxbenchError(f"no {' / '.join(names)} in {sorted(d)}")

    e_m, e_r = get(model, "potential_energy", "energy"), get(reference, "energy", "potential_energy")
    f_m, f_r = get(model, "force", "forces"), get(reference, "forces", "force")
    if e_m.shape != e_r.shape or f_m.shape != f_r.shape:
        raise JaxbenchError(f"model and reference frames differ: energy {e_m.shape} vs {e_r.shape}, forces {f_m.shape} vs {f_r.shape}")
    ev = np.asarray(metrics.energy_violation(e_m, e_r))
    fv = np.asarray(metrics.force_violation(f_m, f_r))
    return {"ev": ev, "fv": fv, "ev_summary": metrics.violation_summary(ev, eps=eps), "fv_summary": metrics.violation_summary(fv, eps=eps)}
