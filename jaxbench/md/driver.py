"""The host loop around the compiled chunk: :func:`simulate`.

Between chunks the host does what the compiled program cannot: checks neighbor-list overflow (and then
re-allocates with more capacity and re-runs the chunk from its start state), appends the chunk's
frames to the H5MD file, updates the progress bar and calls back. Only one chunk of frames lives in
memory unless arrays are requested, so a crash loses at most one chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..compiled import check as check_compiled
from ..errors import Interrupted, JaxbenchError, NeighborListError
from ..metadynamics import check_hills
from .engine import Engine, chunk_fn, compiled_engine, neighbor_fns, require_x64
from .failures import FailureHook, as_hook, describe_failure
from .potentials import EnergyModel, as_energy_model
from .protocol import FS_PER_TIME_UNIT, Protocol
from .start import Start, bonds as replica_bonds, check_start, replica_keys

BATCH_MODES = ("map", "vmap", "vmap_select")


def allocate_batch(cell, pbc, cutoff, skin, multiplier, positions, max_tries: int = 8):
    """Neighbor lists for R replicas with one shared capacity: allocate from every replica's
    positions, keep the largest, rebuild it for each replica; grow the capacity until nothing
    overflows. Returns (NeighborListFns, batched Neighbors, multiplier used)."""
    import jax.numpy as jnp

    positions = np.asarray(positions)
    for _ in range(max_tries):
        nl, rebuild = neighbor_fns(cell, pbc, cutoff, skin, multiplier, positions.shape[1])
        uniq = {positions[r].tobytes(): r for r in range(len(positions))}
        allocs = [nl.allocate(positions[r]) for r in uniq.values()]
        template = max(allocs, key=lambda a: a.capacity)
        template = dataclasses.replace(template, edge_capacity=max(a.edge_capacity for a in allocs))
        if not bool(template.did_overflow):
            # force a rebuild for each replica (reference at infinity)
            template = dataclasses.replace(template, reference_positions=jnp.full_like(template.reference_positions, jnp.inf))
            nbrs = rebuild(jnp.asarray(positions), template)
            if not bool(np.any(np.asarray(nbrs.did_overflow))):
                return nl, nbrs, multiplier
        multiplier *= 1.5
    raise NeighborListError(f"neighbor list still overflows at capacity_multiplier {multiplier:.3g} after {max_tries} tries")


@dataclasses.dataclass
class MDResult:
    """Outcome of :func:`simulate`. ``failed`` [R] bool, ``failure_step`` [R] (-1: none),
    ``failure_reason`` [R] bit mask (:data:`FAILURE_REASONS`), ``steps_done`` (steps advanced by the
    batch), ``arrays`` (the trajectory as :func:`jaxbench.trajectory.read` returns it, when kept in
    memory), ``path`` (the H5MD file, if written), ``timings`` (seconds), ``n_reallocations``, ``seed``
    (of :func:`simulate`: a reference rollout reuses it)."""

    failed: np.ndarray
    failure_step: np.ndarray
    failure_reason: np.ndarray
    steps_done: int
    protocol: Protocol
    path: Path | None = None
    arrays: dict[str, np.ndarray] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    n_reallocations: int = 0
    capacity: int = 0  # neighbor-list slots per replica (pairs within cutoff + skin)
    edge_capacity: int = 0  # edge slots the model saw per replica (pairs within cutoff), 0: all slots
    seed: int = 0
    devices: int = 1  # the replicas were split over this many devices
    hills: dict[str, np.ndarray] | None = None  # metadynamics: centers [R, H, n_cv], heights [R, H] eV, count [R]

    @property
    def failure_time_fs(self) -> np.ndarray:
        return np.where(self.failure_step >= 0, self.failure_step * self.protocol.timestep_fs, np.nan)

    def summary(self) -> str:
        lines = []
        for r in range(len(self.failed)):
            if self.failed[r]:
                lines.append(
                    f"replica {r}: FAILED at step {self.failure_step[r]} ({self.failure_time_fs[r]:.3g} fs): "
                    f"{describe_failure(self.failure_reason[r])}"
                )
            else:
                lines.append(f"replica {r}: stable for {self.steps_done} steps")
        return "\n".join(lines)


class _Chunks:
    """The compiled chunk at the current neighbor-list capacity, re-allocated with more when it overflows."""

    def __init__(self, protocol: Protocol, model: EnergyModel, start: Start, failure_fn, batch: str, devices: int,
                 alloc=None, n_realloc: int = 0):
        self.protocol, self.model, self.start, self.failure_fn, self.batch, self.devices = (
            protocol, model, start, failure_fn, batch, devices)
        # (positions, multiplier) of the last allocation: a resumed run re-allocates from them, so its
        # list has the same capacity and its chunk is the same compiled program
        self.alloc = alloc or (np.asarray(start.positions), float(protocol.capacity_multiplier))
        nl, self.nbrs, self.mult = allocate_batch(start.cell, start.pbc, self.list_radius, protocol.skin,
                                                  self.alloc[1], self.alloc[0])
        self.eng, self.compiled = compiled_engine(protocol, model, start, nl, failure_fn, batch, devices)
        self.n_realloc = n_realloc

    @property
    def list_radius(self) -> float:
        """The neighbour list's cutoff (NPT: wide enough for the most compressed cell it covers)."""
        return float(self.model.cutoff) * self.protocol.list_radius_factor

    def run(self, params, carry, bonds, n_save: int):
        """One chunk from ``carry``; an overflowing list is re-allocated and the chunk re-run from ``carry``."""
        while True:
            new_carry, obs = chunk_fn(self.compiled, self.eng, n_save)(params, carry, bonds)
            if not bool(np.any(np.asarray(new_carry[1].did_overflow))):
                return new_carry, obs
            self.n_realloc += 1
            st, p = self.start, self.protocol
            self.alloc = (np.asarray(self.eng.list_positions(carry[0])), self.mult * 1.5)
            nl, nbrs_new, self.mult = allocate_batch(st.cell, st.pbc, self.list_radius, p.skin, self.alloc[1],
                                                     self.alloc[0])
            self.eng, self.compiled = compiled_engine(p, self.model, st, nl, self.failure_fn, self.batch, self.devices)
            carry = (carry[0], nbrs_new) + tuple(carry[2:])


class _Recorder:
    """Where the frames go between chunks: the H5MD file (appended chunk by chunk), memory, a progress bar."""

    def __init__(self, out, keep_arrays: bool, progress: bool, start: Start, protocol: Protocol, masses, metadata, overwrite,
                 resume_frames: int | None = None, steps_done: int = 0):
        self.writer = None
        if out is not None and resume_frames is not None:
            from ..trajectory import TrajectoryWriter

            self.writer = TrajectoryWriter.reopen(out, resume_frames)
        elif out is not None:
            from ..trajectory import TrajectoryWriter

            extra = {}
            if protocol.metadynamics is not None:
                extra.update(bias_energy=((), "eV"), cv=((len(protocol.metadynamics.dihedrals),), "rad"))
            if protocol.npt:
                extra.update(volume=((), "angstrom3"), pressure=((), "bar"), box_edges=((3, 3), "angstrom"))
            extra = extra or None
            self.writer = TrajectoryWriter(out, start.numbers, masses, start.cell, start.pbc, start.n_replicas,
                                           protocol.timestep_fs, metadata=metadata, overwrite=overwrite,
                                           extra_observables=extra)
        self.keep_arrays, self.kept, self.steps = keep_arrays, [], []
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=int(protocol.steps), initial=steps_done, desc=f"MD {protocol.ensemble} x{start.n_replicas}",
                            unit="step", leave=False)

    def emit(self, steps, obs):
        obs = {k: np.asarray(v) for k, v in obs.items()}
        if self.writer is not None:
            particles = ("position", "velocity", "force")
            self.writer.append(steps, {k: obs[k] for k in particles}, {k: v for k, v in obs.items() if k not in particles})
        if self.keep_arrays:
            self.kept.append(obs)
            self.steps.append(np.asarray(steps))

    def chunk_done(self, steps, obs, carry, n_steps: int, hills=None) -> np.ndarray:
        """Record a chunk's frames, the replicas' status and hills; returns the failure reasons [R]."""
        self.emit(steps, obs)
        reason, fstep = np.asarray(carry[2]), np.asarray(carry[3])
        if self.writer is not None:
            if hills is not None:
                self.writer.write_hills(**hills)
            self.writer.set_status(reason != 0, fstep, reason)
            self.writer.flush()
        if self.bar is not None:
            self.bar.update(n_steps)
            self.bar.set_postfix(failed=int((reason != 0).sum()))
        return reason

    def close(self, complete: bool):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close(complete=complete)

    def arrays(self, protocol: Protocol, start: Start, masses) -> dict | None:
        """The kept frames as :func:`jaxbench.trajectory.read` returns them (None unless kept)."""
        if not self.keep_arrays:
            return None
        arrays = {k: np.concatenate([o[k] for o in self.kept], axis=1) for k in self.kept[0]}
        arrays["step"] = np.concatenate(self.steps)
        arrays["time"] = arrays["step"] * protocol.timestep_fs
        arrays["species"], arrays["mass"], arrays["cell"], arrays["pbc"] = start.numbers, masses, start.cell, start.pbc
        return arrays


def _checked(model, start: Start, protocol: Protocol, params, cutoff, batch: str, out, overwrite: bool, failure_fn,
             resume: bool = False):
    """Everything a run is refused for, before any compute; returns (protocol, EnergyModel, output path)."""
    protocol = protocol.validate()
    model = as_energy_model(model, params=params, cutoff=cutoff)
    if batch not in BATCH_MODES:
        raise JaxbenchError(f"batch must be 'map', 'vmap' or 'vmap_select', got '{batch}'")
    out = Path(out) if out is not None else None
    if resume and out is None:
        raise JaxbenchError("resume=True needs the trajectory file (out=) to continue")
    if out is not None and out.exists() and not overwrite and not resume:
        raise JaxbenchError(f"output {out} exists; refusing to overwrite it (pass overwrite=True / --overwrite, or "
                            "resume=True / --resume to continue it)")
    check_start(start, model)
    as_hook(failure_fn)  # a wrong kind of criterion is named before any compute
    if protocol.npt:
        where = f"protocol '{protocol.name}'" if protocol.name else "protocol"
        if not np.all(start.pbc):
            raise JaxbenchError(f"{where}: ensemble 'npt_nose_hoover' needs a cell periodic along all three axes, "
                                f"the start has pbc={np.asarray(start.pbc).tolist()}")
        if isinstance(failure_fn, FailureHook):
            raise JaxbenchError(f"{where}: a FailureHook (e.g. the RDF criterion) judges frames against the start "
                                "cell, which NPT changes; pass a plain failure_fn(state) (simulate.npt_box(state) is "
                                "the cell) or none")
    return protocol, model, out


def _initial_carry(eng: Engine, compiled: dict, params, start: Start, seed: int, nbrs, bonds):
    """The scan carry at step 0 (state, neighbors, failure reason, failure step, step, hook memory, hills)
    and its frame."""
    import jax.numpy as jnp

    R = start.n_replicas
    keys = replica_keys(seed, R)
    momenta = None
    if start.velocities is not None:
        momenta = jnp.asarray(start.velocities * FS_PER_TIME_UNIT * eng.masses[None, :, None])
    state, reason0, init_obs, mem, hills = compiled["init_all"](params, keys, jnp.asarray(start.positions), momenta,
                                                                nbrs, bonds)
    carry = (state, nbrs, reason0, jnp.where(reason0 != 0, 0, -1).astype(jnp.int32), jnp.zeros(R, jnp.int32), mem, hills)
    return carry, init_obs


def hills_arrays(eng: Engine, carry) -> dict | None:
    """The replicas' hills as numpy (only the deposited ones matter: ``count`` per replica)."""
    if eng.bias is None:
        return None
    h = carry[6]
    return dict(centers=np.asarray(h.centers), heights=np.asarray(h.heights), count=np.asarray(h.count))


def _result(carry, done: int, protocol: Protocol, out, arrays, timings: dict, t0: float, n_realloc: int, seed, devices,
            hills=None):
    import resource

    reason = np.asarray(carry[2])
    timings["total_s"] = time.perf_counter() - t0
    timings["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    return MDResult(
        failed=reason != 0,
        failure_step=np.asarray(carry[3]).astype(np.int64),
        failure_reason=reason,
        steps_done=done,
        protocol=protocol,
        path=out,
        arrays=arrays,
        timings=timings,
        n_reallocations=n_realloc,
        capacity=int(carry[1].senders.shape[-1]),
        edge_capacity=int(carry[1].edge_capacity),
        seed=int(seed),
        devices=devices,
        hills=hills,
    )


def simulate(
    model,
    start: Start,
    protocol: Protocol,
    params=None,
    seed: int = 0,
    out=None,
    overwrite: bool = False,
    keep_arrays: bool | None = None,
    failure_fn: Callable | None = None,
    batch: str = "map",
    progress: bool = True,
    callback: Callable | None = None,
    cutoff: float | None = None,
    metadata: dict | None = None,
    devices: int | None = None,
    resume: bool = False,
) -> MDResult:
    """Run ``protocol`` from ``start`` with ``model`` for all replicas as one compiled batch.

    Args:
      model: a ``Potential`` (pass ``params``), an :class:`EnergyModel`, or ``fn(graph) -> scalar``
        (pass ``cutoff``).
      start: :class:`Start` (``Start.make(...)`` or :func:`start_from_frames`); its replica count wins
        over ``protocol.replicas``.
      seed: replica r's Maxwell–Boltzmann velocities (and Langevin noise) come from
        ``jax.random.fold_in(PRNGKey(seed), r)`` (:func:`replica_keys`): replica r is the same
        whatever the number of replicas.
      out: H5MD file to append to chunk by chunk (refused if it exists unless ``overwrite`` or
        ``resume``); the engine state after each chunk goes beside it (``out.state.npz``,
        :mod:`jaxbench.md.resume`).
      resume: continue the run in ``out`` from its last committed chunk, bit-identical to a run that was
        never interrupted; a finished run is returned without computing. No file (or one killed before
        its first chunk): a fresh run. The protocol, model weights, start, seed and batching must be the
        run's (else :class:`ResumeError` names what differs); with ``overwrite`` as well, a run that does
        not match is started again instead. ``devices`` defaults to the run's.
      keep_arrays: also return the trajectory in memory (default: only when ``out`` is None).
      failure_fn: ``failure_fn(state) -> bool`` on a jax-md state (``state.position`` [N, 3] Å, ...),
        checked at every saved frame, or a :class:`FailureHook` (a criterion with memory, e.g.
        :func:`jaxbench.metrics.rdf_stability_hook`).
      batch: 'map' (``lax.map`` over replicas, default), 'vmap' (batched step with one outer
        neighbor-rebuild cond) or 'vmap_select' (plain vmap of the per-replica chunk).
      devices: split the replicas over this many local devices (each runs its share with ``batch``);
        default: all local devices, at most one per replica. On a CPU call
        :func:`jaxbench.use_cpu_devices` before JAX starts to get one device per core.
      callback: called after every chunk with a dict (chunk, steps_done, failed, path).

    With ``out``, SIGTERM and SIGINT let the chunk in flight finish and be committed with its state,
    then raise :class:`jaxbench.errors.Interrupted` (a second signal acts at once).
    """
    from ..interrupts import deferred
    from ..locks import locked

    require_x64()
    check_compiled()  # before this run compiles: a long session's cached programs stay under the kernel's limit
    protocol, model, out = _checked(model, start, protocol, params, cutoff, batch, out, overwrite, failure_fn, resume)
    # a second process writing the same trajectory gets a named error, not an interleaved file
    with locked(out, "trajectory", file=True) if out is not None else contextlib.nullcontext():
        with deferred(out is not None) as interrupted:
            return _simulate(model, start, protocol, params, seed, out, overwrite, keep_arrays, failure_fn, batch,
                             progress, callback, devices, metadata, resume, interrupted)


def _saved_state(out: Path, overwrite: bool):
    """The run's resume state, or None for a fresh run (no file yet, or nothing past the initial frame)."""
    from ..trajectory import read_info
    from . import resume as rs

    spath = rs.state_path(out)
    if spath.exists():
        return rs.load(spath)
    if not out.exists():
        return None
    try:
        frames = int(read_info(out).get("frames_committed", 0))
    except Exception:  # noqa: BLE001 - killed while the file was being created (no state: no chunk was done)
        return None
    if frames <= 1 or overwrite:
        return None  # killed before its first chunk: nothing to lose
    raise rs.ResumeError(f"cannot resume {out}: it has {frames} frames but no resume state {spath.name} (written by "
                         "an older jaxbench?); start again with overwrite=True / --overwrite")


def _simulate(model, start, protocol, params, seed, out, overwrite, keep_arrays, failure_fn, batch, progress, callback,
              devices, metadata, resume, interrupted) -> MDResult:
    import jax
    import jax.numpy as jnp

    from ..devices import count as device_count
    from . import resume as rs

    saved = _saved_state(out, overwrite) if resume else None
    if saved is not None and devices is None:
        devices = saved.fingerprint.get("devices")
    keep_arrays = out is None if keep_arrays is None else keep_arrays
    devices = device_count(devices, start.n_replicas, JaxbenchError)
    params = jax.tree.map(jnp.asarray, model.params)
    fp = rs.fingerprint(protocol, model, params, start, seed, batch, devices)
    if saved is not None:
        try:
            rs.check_fingerprint(saved, fp, out)
        except rs.ResumeError:
            if not overwrite:
                raise
            saved = None  # resume-or-restart: this run is another one
    spath = rs.state_path(out) if out is not None else None
    if spath is not None and saved is None:
        spath.unlink(missing_ok=True)  # a stale state must never be applied to the new file
    t0 = time.perf_counter()

    chunks = _Chunks(protocol, model, start, failure_fn, batch, devices,
                     *((saved.alloc_positions, saved.alloc_multiplier), saved.n_reallocations) if saved else ())
    bonds = tuple(jnp.asarray(b) for b in replica_bonds(start, protocol.bond_factor))
    carry, init_obs = _initial_carry(chunks.eng, chunks.compiled, params, start, seed, chunks.nbrs, bonds)
    if saved is not None:
        carry = rs.restore(carry, saved, out)
    meta = {**dict(protocol=protocol.to_dict(), model=model.name, seed=int(seed), batch=batch, devices=devices,
                   frame_indices=list(start.frame_indices)), **(metadata or {})}
    # resume=True without a state: the file (if any) holds no finished chunk, so it is replaced
    rec = _Recorder(out, keep_arrays and saved is None, progress, start, protocol, chunks.eng.masses, meta,
                    overwrite or resume,
                    resume_frames=saved.frames_committed if saved else None, steps_done=saved.steps_done if saved else 0)
    if saved is None:
        rec.emit(np.array([0]), {k: v[:, None] for k, v in init_obs.items()})

    every, chunk, total = int(protocol.save_every), int(protocol.chunk_steps), int(protocol.steps)
    timings = {"setup_s": time.perf_counter() - t0, "first_chunk_s": 0.0, "chunks_s": 0.0}
    done, c0 = (saved.steps_done, saved.chunks_done) if saved else (0, 0)
    if saved is not None:
        timings["resumed_at_step"] = float(done)
    try:
        for c in range(c0, math.ceil(total / chunk)):
            if np.all(np.asarray(carry[2]) != 0):
                break
            steps_here = min(chunk, total - done)
            n_save = steps_here // every
            tc = time.perf_counter()
            new_carry, obs = chunks.run(params, carry, bonds, n_save)
            jax.block_until_ready(new_carry)
            timings["first_chunk_s" if c == c0 else "chunks_s"] += time.perf_counter() - tc
            carry, done = new_carry, done + steps_here
            hills = hills_arrays(chunks.eng, carry)
            try:
                reason = rec.chunk_done(done - steps_here + every * np.arange(1, n_save + 1), obs, carry, steps_here,
                                        hills)
                if spath is not None:
                    rs.save(spath, carry, frames_committed=rec.writer.n_frames, steps_done=done, chunks_done=c + 1,
                            alloc_positions=chunks.alloc[0], alloc_multiplier=chunks.alloc[1],
                            n_reallocations=chunks.n_realloc, fingerprint=fp, timings=timings)
            except OSError as e:  # disk full, quota, read-only remount: the last saved chunk stays the resume point
                raise JaxbenchError(f"writing chunk {c} (steps {done - steps_here}-{done}) of {out} failed: {e}; the "
                                    "frames and engine state of the chunks before it are intact: free space and "
                                    "continue with resume=True / --resume") from e
            if hills is not None:
                check_hills(carry[6], f"protocol '{protocol.name}', after step {done}")
            if callback is not None:
                callback(dict(chunk=c, steps_done=done, failed=reason != 0, path=out))
            if interrupted() is not None and done < total and not np.all(reason != 0):
                raise Interrupted(interrupted(), f"simulation {out} stopped after step {done} of {total} (signal "
                                  f"{interrupted()}); the chunks so far and the engine state are on disk: continue "
                                  "with resume=True / `jaxbench simulate ... --resume`")
    finally:
        rec.close(complete=done >= total or bool(np.all(np.asarray(carry[2]) != 0)))
    arrays = rec.arrays(protocol, start, chunks.eng.masses)
    if keep_arrays and saved is not None:
        from ..trajectory import read

        arrays = read(out)
    return _result(carry, done, protocol, out, arrays, timings, t0, chunks.n_realloc, seed, devices,
                   hills_arrays(chunks.eng, carry))
