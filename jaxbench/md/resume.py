"""The engine state saved beside a trajectory after every committed chunk, so that
``simulate(..., resume=True)`` continues a killed run bit for bit.

``FILE.h5`` gets ``FILE.h5.state.npz``: every leaf of the scan carry (positions, momenta, forces,
thermostat chains, RNG keys, the neighbour list as it was, failure flags, failure-hook memory,
metadynamics hills), the host loop's counters, how the neighbour list was last allocated (so the
resumed run compiles the same program) and a fingerprint of what the carry depends on (protocol,
model weights, seed, start, batching). It is written after the chunk's frames are committed to the
HDF5 file, to a temporary name that is fsynced and renamed, so the state on disk always belongs to
frames that are on disk too: a kill between the two leaves the file a chunk ahead of the state, and
the resume truncates the file back to the state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import JaxbenchError

STATE_VERSION = 1


class ResumeError(JaxbenchError):
    """The saved state does not fit the run being resumed (other protocol, model, start, ...)."""


def state_path(trajectory) -> Path:
    trajectory = Path(trajectory)
    return trajectory.with_name(trajectory.name + ".state.npz")


def digest(*arrays) -> str:
    """sha256 of arrays' dtypes, shapes and bytes (model weights, starts)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fingerprint(protocol, model, params, start, seed: int, batch: str, devices: int) -> dict[str, Any]:
    """What the carry of a run depends on; a resume must match it key for key."""
    import jax

    fp = dict(
        version=STATE_VERSION, protocol=protocol.to_dict(), model=model.name, cutoff=float(model.cutoff), seed=int(seed), batch=batch,
        devices=int(devices), params_sha256=digest(*jax.tree.leaves(params)),
        start_sha256=digest(start.positions, start.numbers, start.cell, start.pbc,
                            *(() if start.velocities is None else (start.velocities,))),
    )
    return json.loads(json.dumps(fp))  # as it reads back from the file (tuples become lists)


@dataclasses.dataclass(frozen=True)
class SavedState:
    leaves: list[np.ndarray]
    frames_committed: int  # frames of the trajectory file this state belongs to
    steps_done: int
    chunks_done: int
    alloc_positions: np.ndarray  # [R, N, 3] the positions the neighbour list was last allocated from
    alloc_multiplier: float  # ... and the capacity multiplier it was asked for
    n_reallocations: int
    fingerprint: dict[str, Any]
    timings: dict[str, float]


def save(path: Path, carry, *, frames_committed: int, steps_done: int, chunks_done: int, alloc_positions,
         alloc_multiplier: float, n_reallocations: int, fingerprint: dict, timings: dict) -> None:
    """Write the state atomically (temporary file, fsync, rename, fsync of the directory)."""
    import jax

    leaves = {f"leaf_{i:04d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(carry))}
    meta = dict(frames_committed=int(frames_committed), steps_done=int(steps_done), chunks_done=int(chunks_done),
                alloc_multiplier=float(alloc_multiplier), n_reallocations=int(n_reallocations),
                fingerprint=fingerprint, timings=timings)
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    for stale in path.parent.glob(path.name + ".tmp*"):  # left by a writer killed mid-write (one writer per run)
        if stale != tmp:
            stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), alloc_positions=np.asarray(alloc_positions), **leaves)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path) -> SavedState:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            names = sorted(k for k in z.files if k.startswith("leaf_"))
            leaves = [z[k] for k in names]
            alloc_positions = z["alloc_positions"]
    except (OSError, ValueError, KeyError) as e:
        raise ResumeError(f"resume state {path} is unreadable ({type(e).__name__}: {e}); "
                          "start the run again with overwrite=True / --overwrite") from e
    if meta.get("fingerprint", {}).get("version") != STATE_VERSION:
        raise ResumeError(f"resume state {path} has version {meta.get('fingerprint', {}).get('version')}, "
                          f"this jaxbench writes {STATE_VERSION}; start the run again with --overwrite")
    return SavedState(leaves=leaves, frames_committed=meta["frames_committed"], steps_done=meta["steps_done"],
                      chunks_done=meta["chunks_done"], alloc_positions=alloc_positions,
                      alloc_multiplier=meta["alloc_multiplier"], n_reallocations=meta["n_reallocations"],
                      fingerprint=meta["fingerprint"], timings=meta.get("timings", {}))


def check_fingerprint(saved: SavedState, current: dict, path: Path) -> None:
    """Name the first key where the run being resumed differs from the saved one."""
    for key in current:
        if saved.fingerprint.get(key) != current[key]:
            was, now = saved.fingerprint.get(key), current[key]
            if key == "protocol":
                diff = sorted(k for k in set(was or {}) | set(now) if (was or {}).get(k) != now.get(k))
                was, now = {k: (was or {}).get(k) for k in diff}, {k: now.get(k) for k in diff}
            raise ResumeError(f"cannot resume {path}: its {key} was {was!r}, this run's is {now!r}; pass the "
                              "same settings, or start again with overwrite=True / --overwrite")


def restore(template_carry, saved: SavedState, path: Path):
    """The saved leaves in the structure of ``template_carry`` (a fresh carry of the same allocation)."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(template_carry)
    if len(leaves) != len(saved.leaves):
        raise ResumeError(f"cannot resume {path}: the saved state has {len(saved.leaves)} arrays, this run's engine "
                          f"state {len(leaves)} (another failure criterion or integrator?)")
    for i, (t, s) in enumerate(zip(leaves, saved.leaves)):
        if tuple(t.shape) != tuple(s.shape) or np.dtype(t.dtype) != s.dtype:
            raise ResumeError(f"cannot resume {path}: engine state array {i} is {s.dtype}{list(s.shape)} on disk, "
                              f"{np.dtype(t.dtype)}{list(t.shape)} in this run")
    return jax.tree.unflatten(treedef, [jnp.asarray(s) for s in saved.leaves])
