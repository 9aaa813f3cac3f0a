"""MD trajectories on disk: HDF5 in the H5MD 1.1 layout, appended per chunk and crash-safe.

Layout (one H5MD *particles group per replica*, so every group is a plain, standard H5MD group that
H5MD readers understand; replicas can stop at different steps without padding):

    /h5md                              attrs version=[1, 1]; groups author (name), creator (name, version)
    /particles/replica_000/
        position/{step,time,value}     value [T, N, 3] Å, unwrapped Cartesian (never wrapped)
        velocity/{step,time,value}     value [T, N, 3] Å/fs
        force/{step,time,value}        value [T, N, 3] eV/Å
        species                        [N] int32 atomic numbers (time-independent)
        mass                           [N] float64 amu (time-independent)
        box/                           attrs dimension=3, boundary=['periodic'|'none'] * 3
            edges                      [3, 3] Å, ROWS are the lattice vectors (the start cell)
    /particles/replica_001/ ...
    /observables/replica_000/
        potential_energy, kinetic_energy, conserved_energy  {step,time,value [T]} eV
        temperature                                         {step,time,value [T]} K
        volume, pressure, box_edges (NPT only)              Å³, bar (virial + kinetic), [T, 3, 3] Å the cell
    /parameters/jaxbench               attrs: protocol (JSON), frames_committed, steps_done, failed [R],
                                       failure_step [R] (-1: none), failure_reason [R] (bit mask,
                                       see jaxbench.md.FAILURE_REASONS), complete (bool), model, ...

All ``step`` / ``time`` datasets of one file hold the same values (every replica is saved at the same
steps; a failed replica's frozen state keeps being written). ``time`` is in fs (attr ``unit``).

Crash safety: each chunk resizes every dataset, writes it, then sets ``frames_committed`` and calls
``flush()``. A run killed at any point leaves a readable file; :func:`read` returns only the first
``frames_committed`` frames (rows past it may be partially written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, JaxbenchError

__all__ = ["TrajectoryWriter", "read", "read_info", "to_extxyz", "PARTICLE_FIELDS", "OBSERVABLES"]

PARTICLE_FIELDS = {"position": "angstrom", "velocity": "angstrom fs-1", "force": "eV angstrom-1"}
OBSERVABLES = {
    "potential_energy": "eV",
    "kinetic_energy": "eV",
    "conserved_energy": "eV",
    "temperature": "K",
}


def _group_name(r: int) -> str:
    return f"replica_{r:03d}"


class TrajectoryWriter:
    """Append-only H5MD writer (see the module docstring for the layout).

    Args:
      path: output ``.h5`` file; refused if it exists unless ``overwrite``.
      numbers: [N] atomic numbers; masses: [N] amu; cell: [3, 3] rows = lattice vectors; pbc: [3].
      n_replicas: number of particle groups.
      timestep_fs: MD timestep (``time = step * timestep_fs``).
      metadata: JSON-serialisable dict stored in ``/parameters/jaxbench`` attrs (``protocol`` etc.).
    """

    def __init__(
        self,
        path,
        numbers,
        masses,
        cell,
        pbc,
        n_replicas: int,
        timestep_fs: float,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
        compression: str | None = None,
        extra_observables: dict[str, tuple[tuple, str]] | None = None,
    ):
        import h5py

        import jaxbench

        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise JaxbenchError(f"trajectory file {self.path} exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        numbers = np.asarray(numbers, np.int32)
        n = len(numbers)
        self.n_atoms, self.n_replicas, self.dt = n, int(n_replicas), float(timestep_fs)
        self._f = h5py.File(self.path, "w")
        f = self._f
        h5 = f.create_group("h5md")
        h5.attrs["version"] = np.array([1, 1], np.int32)
        h5.create_group("author").attrs["name"] = os.environ.get("USER", "jaxbench")
        cr = h5.create_group("creator")
        cr.attrs["name"] = "jaxbench"
        cr.attrs["version"] = str(getattr(jaxbench, "__version__", "0"))
        chunk_t = max(1, min(64, int(2**20 // max(1, n * 3 * 8))))
        pbc = np.asarray(pbc, bool).reshape(3)
        self._datasets = []
        for r in range(self.n_replicas):
            g = f.create_group(f"particles/{_group_name(r)}")
            g.create_dataset("species", data=numbers)
            g.create_dataset("mass", data=np.asarray(masses, np.float64)).attrs["unit"] = "amu"
            box = g.create_group("box")
            box.attrs["dimension"] = 3
            box.attrs["boundary"] = np.array(["periodic" if p else "none" for p in pbc], dtype="S8")
            box.create_dataset("edges", data=np.asarray(cell, np.float64).reshape(3, 3)).attrs["unit"] = "angstrom"
            for name, unit in PARTICLE_FIELDS.items():
                self._element(g, name, (n, 3), unit, chunk_t, compression)
            o = f.create_group(f"observables/{_group_name(r)}")
            for name, unit in OBSERVABLES.items():
                self._element(o, name, (), unit, 1024, None)
            for name, (shape, unit) in (extra_observables or {}).items():
                self._element(o, name, tuple(shape), unit, 1024, None)
        self._meta = f.create_group("parameters").create_group("jaxbench")
        for k, v in (metadata or {}).items():
            self._meta.attrs[k] = v if isinstance(v, (int, float, str, bool, np.ndarray)) else json.dumps(v)
        self._meta.attrs["timestep_fs"] = self.dt
        self._meta.attrs["frames_committed"] = 0
        self._meta.attrs["steps_done"] = 0
        self._meta.attrs["complete"] = False
        self.set_status(np.zeros(self.n_replicas, bool), np.full(self.n_replicas, -1), np.zeros(self.n_replicas, np.int32))
        self.n_frames = 0
        f.flush()

    @classmethod
    def reopen(cls, path, frames: int) -> "TrajectoryWriter":
        """Open an existing file to append to it after its first ``frames`` frames (a resumed run):
        rows past them (a chunk written after the saved engine state, or a partly written one) are cut."""
        import h5py

        self = cls.__new__(cls)
        self.path = Path(path)
        try:
            f = h5py.File(self.path, "r+")
        except OSError as e:
            raise JaxbenchError(f"trajectory file {self.path} cannot be opened to resume it: {e}") from e
        self._f = f
        self._meta = f["parameters/jaxbench"]
        committed = int(self._meta.attrs["frames_committed"])
        if committed < frames:
            f.close()
            raise JaxbenchError(f"trajectory file {self.path} has {committed} committed frames, its resume state "
                                f"belongs to {frames}: the file was changed or truncated; start again with --overwrite")
        self._datasets = []
        for top in ("particles", "observables"):
            for rep in f[top].values():
                for e in rep.values():
                    if isinstance(e, h5py.Group) and "value" in e and "step" in e:
                        for ds in (e["value"], e["step"], e["time"]):
                            ds.resize(frames, axis=0)
                        self._datasets.append(e)
        groups = sorted(f["particles"].keys())
        self.n_replicas = len(groups)
        self.n_atoms = int(f[f"particles/{groups[0]}/species"].shape[0])
        self.dt = float(self._meta.attrs["timestep_fs"])
        self.n_frames = frames
        self._meta.attrs["frames_committed"] = frames
        self._meta.attrs["steps_done"] = int(f[f"particles/{groups[0]}/position/step"][frames - 1]) if frames else 0
        self._meta.attrs["complete"] = False
        f.flush()
        return self

    def _element(self, group, name, shape, unit, chunk_t, compression):
        e = group.create_group(name)
        e.create_dataset("step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(max(chunk_t, 256),))
        t = e.create_dataset("time", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(max(chunk_t, 256),))
        t.attrs["unit"] = "fs"
        v = e.create_dataset(
            "value", shape=(0, *shape), maxshape=(None, *shape), dtype=np.float64, chunks=(chunk_t, *shape),
            compression=compression,
        )
        v.attrs["unit"] = unit
        self._datasets.append(e)

    def append(self, steps, particles: dict[str, np.ndarray], observables: dict[str, np.ndarray]) -> None:
        """Append T frames. ``steps`` [T]; ``particles[name]`` [R, T, N, 3]; ``observables[name]`` [R, T].

        Everything of the chunk is written, then ``frames_committed`` is advanced and the file flushed.
        """
        steps = np.asarray(steps, np.int64).reshape(-1)
        t = len(steps)
        if t == 0:
            return
        start, stop = self.n_frames, self.n_frames + t
        f = self._f
        for r in range(self.n_replicas):
            for group, fields in ((f"particles/{_group_name(r)}", particles), (f"observables/{_group_name(r)}", observables)):
                for name, arr in fields.items():
                    e = f[f"{group}/{name}"]
                    val = np.asarray(arr[r], np.float64)
                    for ds, data in ((e["value"], val), (e["step"], steps), (e["time"], steps * self.dt)):
                        ds.resize(stop, axis=0)
                        ds[start:stop] = data
        self.n_frames = stop
        self._meta.attrs["frames_committed"] = stop
        self._meta.attrs["steps_done"] = int(steps[-1])
        f.flush()

    def write_hills(self, centers, heights, count) -> None:
        """The metadynamics hills of every replica (``/metadynamics/replica_XXX``), rewritten in place after
        each chunk: centers [R, H, n_cv] (CV units), heights [R, H] eV, count [R] (slots in use)."""
        for r in range(self.n_replicas):
            name = f"metadynamics/{_group_name(r)}"
            if name not in self._f:
                g = self._f.create_group(name)
                g.create_dataset("centers", data=np.asarray(centers[r], np.float64))
                g.create_dataset("heights", data=np.asarray(heights[r], np.float64)).attrs["unit"] = "eV"
            g = self._f[name]
            g["centers"][...] = np.asarray(centers[r], np.float64)
            g["heights"][...] = np.asarray(heights[r], np.float64)
            g.attrs["count"] = int(np.asarray(count)[r])

    def set_status(self, failed, failure_step, failure_reason, **extra) -> None:
        self._meta.attrs["failed"] = np.asarray(failed, bool)
        self._meta.attrs["failure_step"] = np.asarray(failure_step, np.int64)
        self._meta.attrs["failure_reason"] = np.asarray(failure_reason, np.int32)
        for k, v in extra.items():
            self._meta.attrs[k] = v if isinstance(v, (int, float, str, bool, np.ndarray)) else json.dumps(v)

    def flush(self) -> None:
        self._f.flush()

    def close(self, complete: bool = True) -> None:
        if self._f.id.valid:
            self._meta.attrs["complete"] = bool(complete)
            self._f.flush()
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(complete=exc_type is None)


def _attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except ValueError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def _open_read(path):
    """Open for reading without HDF5's file lock, so a running simulation's file (held open for writing)
    can be read: readers only take the frames the writer has committed and flushed (``frames_committed``).
    A path that is not a readable HDF5 file is a `DataError` naming it (never h5py's raw OSError)."""
    import h5py

    path = Path(path)
    file = str(path)
    if not path.exists():
        raise DataError("no such trajectory file", file=file)
    if path.is_dir():
        raise DataError("is a directory, not a trajectory file", file=file)
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes): not a trajectory (did the run start?)", file=file)
    if not h5py.is_hdf5(file):
        raise DataError("not an HDF5 file (no HDF5 signature), so not a jaxbench trajectory", file=file)
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot open this HDF5 file ({why}); the file is truncated or corrupt", file=file) from None


def _node(f, key: str, file: str):
    """The group or dataset `key` of an open file; a missing one names the file and the key."""
    try:
        return f[key]
    except KeyError:
        raise DataError("missing: not a complete jaxbench trajectory (the layout is in jaxbench.trajectory)",
                        file=file, key=key) from None


def _attr_of(node, name: str, file: str):
    try:
        return node.attrs[name]
    except KeyError:
        raise DataError(f"attribute '{name}' missing", file=file, key=node.name.lstrip("/")) from None


def _replica_groups(f, file: str) -> list[str]:
    groups = sorted(_node(f, "particles", file).keys())
    if not groups:
        raise DataError("no replica groups (replica_000, ...): the file holds no particles", file=file, key="particles")
    return groups


def _rows(f, key: str, n: int, file: str, shape: tuple | None = None) -> np.ndarray:
    """The first `n` (committed) rows of dataset `key`, checked to exist and to have per-row `shape`."""
    ds = _node(f, key, file)
    if shape is not None and tuple(ds.shape[1:]) != tuple(shape):
        raise DataError(f"has shape {ds.shape}, expected (frames, {', '.join(map(str, shape))})", file=file, key=key)
    if ds.shape[0] < n:
        raise DataError(f"has {ds.shape[0]} rows but frames_committed is {n}: the file was truncated or changed",
                        file=file, key=key)
    try:
        return ds[:n]
    except OSError as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot read ({why}); the file is truncated or corrupt", file=file, key=key) from None


def read_info(path) -> dict[str, Any]:
    """The ``/parameters/jaxbench`` attributes (JSON decoded), plus ``n_replicas`` and ``n_atoms``."""
    file = str(path)
    with _open_read(path) as f:
        info = {k: _attr(v) for k, v in _node(f, "parameters/jaxbench", file).attrs.items()}
        groups = _replica_groups(f, file)
        info["n_replicas"] = len(groups)
        info["n_atoms"] = int(_node(f, f"particles/{groups[0]}/species", file).shape[0])
    return info


def _committed(info: dict, file: str) -> int:
    n = info.get("frames_committed", 0)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(f"attribute 'frames_committed' must be a non-negative integer, got {n!r}", file=file,
                        key="parameters/jaxbench")
    return int(n)


def _pick_replicas(groups: list[str], replicas, file: str) -> list[str]:
    if replicas is None:
        return groups
    picked = [int(r) for r in np.atleast_1d(replicas)]
    for r in picked:
        if not -len(groups) <= r < len(groups):
            raise DataError(f"replica {r} out of range: the file has {len(groups)} replicas", file=file)
    return [groups[r] for r in picked]


def _hills(f, groups: list[str], file: str) -> dict[str, np.ndarray]:
    mg = [_node(f, f"metadynamics/{g}", file) for g in groups]
    return dict(centers=np.stack([_node(g, "centers", file)[:] for g in mg]),
                heights=np.stack([_node(g, "heights", file)[:] for g in mg]),
                count=np.asarray([int(_attr_of(g, "count", file)) for g in mg]))


def _box(f, group: str, file: str) -> tuple[np.ndarray, np.ndarray]:
    """(cell [3, 3], pbc [3]) of a particles group."""
    cell = _node(f, f"{group}/box/edges", file)[:]
    if cell.shape != (3, 3):
        raise DataError(f"has shape {cell.shape}, expected (3, 3)", file=file, key=f"{group}/box/edges")
    boundary = _attr_of(_node(f, f"{group}/box", file), "boundary", file)
    return cell, np.array([b == b"periodic" or b == "periodic" for b in boundary])


def read(path, replicas=None) -> dict[str, Any]:
    """Read a trajectory into numpy arrays (only the committed frames, so killed runs read fine).

    Returns a dict: ``step`` [T], ``time`` [T] fs, ``position`` / ``velocity`` / ``force`` [R, T, N, 3],
    ``potential_energy`` / ``kinetic_energy`` / ``conserved_energy`` / ``temperature`` [R, T] (and any other
    observable the run saved: ``bias_energy`` [R, T], ``cv`` [R, T, n_cv] under metadynamics, with ``hills``),
    ``species`` [N], ``mass`` [N], ``cell`` [3, 3], ``pbc`` [3], ``info`` (see :func:`read_info`).

    Raises `DataError` naming the file and the group / dataset at fault for a file that is missing, not
    HDF5, truncated, lacks part of the layout, or has fewer rows than it says it committed.
    """
    file = str(path)
    info = read_info(path)
    n = _committed(info, file)
    with _open_read(path) as f:
        groups = _pick_replicas(_replica_groups(f, file), replicas, file)
        g0 = f"particles/{groups[0]}"
        species = _node(f, f"{g0}/species", file)[:]
        out: dict[str, Any] = {
            "step": _rows(f, f"{g0}/position/step", n, file),
            "time": _rows(f, f"{g0}/position/time", n, file),
            "species": species,
            "mass": _node(f, f"{g0}/mass", file)[:],
        }
        out["cell"], out["pbc"] = _box(f, g0, file)
        for name in PARTICLE_FIELDS:
            out[name] = np.stack([_rows(f, f"particles/{g}/{name}/value", n, file, shape=(len(species), 3)) for g in groups])
        for name in _node(f, f"observables/{groups[0]}", file):
            shape = _node(f, f"observables/{groups[0]}/{name}/value", file).shape[1:]
            out[name] = np.stack([_rows(f, f"observables/{g}/{name}/value", n, file, shape=shape) for g in groups])
        if "metadynamics" in f:
            out["hills"] = _hills(f, groups, file)
    out["info"] = info
    return out


def to_extxyz(path, out, replica: int = 0, every: int = 1) -> int:
    """Write one replica of an H5MD trajectory as extended XYZ (via ASE): positions, velocities,
    forces and potential energy per frame (NPT: each frame's cell). Returns the number of frames written."""
    import ase
    import ase.io
    import ase.units
    from ase.calculators.singlepoint import SinglePointCalculator

    tr = read(path, replicas=[replica])
    images = []
    for t in range(0, len(tr["step"]), every):
        cell = tr["box_edges"][0, t] if "box_edges" in tr else tr["cell"]  # NPT: the frame's own cell
        atoms = ase.Atoms(numbers=tr["species"], positions=tr["position"][0, t], cell=cell, pbc=tr["pbc"])
        atoms.set_masses(tr["mass"])
        atoms.set_velocities(tr["velocity"][0, t] / ase.units.fs)  # Å/fs -> ASE units
        atoms.calc = SinglePointCalculator(atoms, energy=float(tr["potential_energy"][0, t]), forces=tr["force"][0, t])
        atoms.info["step"] = int(tr["step"][t])
        atoms.info["time_fs"] = float(tr["time"][t])
        atoms.info["temperature_K"] = float(tr["temperature"][0, t])
        images.append(atoms)
    ase.io.write(str(out), images, format="extxyz")
    return len(images)
