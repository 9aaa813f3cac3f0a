"""Reading reference data into `Frames`, and writing `Frames` as extended XYZ.

Readers:

- `read_nequip_npz`: nequip-style ``.npz`` (``pos``, ``energy``, ``forces``, ``atomic_numbers``,
  ``cell``, ``pbc``; optional ``stress`` / ``virial``), with the common aliases (sGDML ``R``/``E``/``F``/``z``).
- `read_deepmd`: a DeePMD-kit "npy" system directory (``type.raw``, ``type_map.raw``, ``set.*/``).
- `read_ase`: anything `ase.io.read` reads (extxyz, ASE db, trajectory, ...).
- `read`: dispatch on the path (directory with ``type.raw`` -> DeePMD, ``.npz`` -> nequip, else ASE).

Every reader records, per frame, ``source = "<file>#<frame number in that file>"`` so that a
validation error names the file and the file's own frame number, and validates by default
(`Frames.validate`: finite values, sane cells, no two atoms closer than 0.1 Å).
Everything that is wrong with an input file is reported as a `DataError` naming the file and key
(and frame / atoms where known), never as a raw zipfile / numpy / ASE traceback.

Units are not converted: positions and cells in Å, energy in eV (total), forces in eV/Å, stress in
eV/Å³ (ASE sign convention, see `jaxbench.frames`), virial in eV. The original sGDML MD17 ``.npz``
files use kcal/mol: convert those before reading them here.

Virial and stress: DeePMD-kit and nequip both define the virial as W = -dE/dε (ε the strain), and
ASE / nequip define the stress as σ = (1/V) dE/dε; hence, everywhere in this module,
``stress = -virial / volume`` with volume = |det(cell)|. For a system under positive pressure
(wants to expand, dE/dε < 0) the virial trace is positive and the stress trace negative;
pressure = -trace(stress)/3 (configurational part only: DFT virials exclude the kinetic term).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import DataError
from .frames import Frames, check_cell, voigt_to_full

__all__ = [
    "NEQUIP_KEYS",
    "read",
    "read_nequip_npz",
    "read_deepmd",
    "read_ase",
    "write_extxyz",
    "virial_to_stress",
]

# Canonical quantity -> keys looked for in a nequip-style npz, first match wins.
NEQUIP_KEYS: dict[str, tuple[str, ...]] = {
    "positions": ("pos", "R", "positions"),
    "numbers": ("atomic_numbers", "z", "Z", "numbers"),
    "energy": ("energy", "E", "total_energy"),
    "forces": ("forces", "F", "force"),
    "cell": ("cell", "lattice"),
    "pbc": ("pbc",),
    "stress": ("stress",),
    "virial": ("virial",),
}
NEQUIP_REQUIRED = ("positions", "numbers", "energy", "forces")

# Exceptions numpy / zipfile raise for a truncated or corrupt file.
_CORRUPT = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError, NotImplementedError)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def virial_to_stress(virial, cell, file=None, key: str = "virial", frames: Sequence[Any] | None = None) -> np.ndarray:
    """stress [F,3,3] = -virial / |det(cell)| (see the module docstring for the sign convention).

    `virial`: [F,3,3], [F,9] (row-major) or [F,6] (Voigt xx,yy,zz,yz,xz,xy); `cell`: [F,3,3].
    `frames`: the file's frame numbers, for the error raised when a cell has no volume.
    """
    virial = np.asarray(virial, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    F = cell.shape[0]
    if virial.shape == (F, 9):
        virial = virial.reshape(F, 3, 3)
    elif virial.shape == (F, 6):
        virial = voigt_to_full(virial)
    if virial.shape != (F, 3, 3):
        raise DataError(f"virial has shape {virial.shape}, expected ({F}, 9), ({F}, 3, 3) or ({F}, 6)", file=file, key=key)
    vol = np.abs(np.linalg.det(cell))
    lengths = np.prod(np.maximum(np.linalg.norm(cell, axis=-1), 1e-300), axis=-1)
    bad = ~(vol > 1e-8 * lengths)
    if bad.any():
        f = int(np.argmax(bad))
        where = dict(file=file, frame=frames[f] if frames is not None else f)
        check_cell(cell[f], np.ones(3, bool), **where)  # names a zero or singular cell precisely
        raise DataError(
            f"a virial is given but the cell {cell[f].tolist()} has no volume, so stress = -virial/volume is undefined",
            key=key, **where,
        )
    return -virial / vol[:, None, None]


def _file_frame_sources(file: str, numbers: Iterable[int]) -> np.ndarray:
    return np.array([f"{file}#{k}" for k in numbers], dtype=object)


def _why(e: BaseException) -> str:
    """First line of an exception message (numpy appends advice to trust the file: not wanted)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _present(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names) if names else "(none)"


# --------------------------------------------------------------------------------------------
# nequip npz
# --------------------------------------------------------------------------------------------
def _open_npz(path: Path):
    file = str(path)
    if not path.exists():
        raise DataError("no such file", file=file)
    if path.is_dir():
        raise DataError("is a directory, not an .npz file", file=file)
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes): a failed or interrupted download?", file=file)
    with open(path, "rb") as f:
        magic = f.read(6)
    if not (magic.startswith(b"PK\x03\x04") or magic.startswith(b"PK\x05\x06") or magic == b"\x93NUMPY"):
        raise DataError(
            f"not an .npz archive: it starts with {magic!r}, not the zip signature b'PK\\x03\\x04'; "
            "the file is corrupt or in another format",
            file=file,
        )
    try:
        z = np.load(path, allow_pickle=False)
    except _CORRUPT as e:
        raise DataError(
            f"not a readable .npz archive ({_why(e)}); the file is truncated or corrupt", file=file
        ) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"holds a single .npy array of shape {np.shape(z)}, not an .npz archive of named arrays", file=file)
    return z


def _npz_array(z, name: str, file: str) -> np.ndarray:
    try:
        a = z[name]
    except _CORRUPT as e:
        raise DataError(
            f"cannot read this array ({_why(e)}); the file is truncated or corrupt", file=file, key=name
        ) from None
    # Text arrays would otherwise be parsed by numpy's float conversion, by accident and only sometimes.
    if a.dtype.kind not in "biuf":
        raise DataError(f"expected a numeric array, got dtype {a.dtype} of shape {a.shape}", file=file, key=name)
    return a


def read_nequip_npz(
    path,
    pbc=None,
    keys: Mapping[str, str | Sequence[str] | None] | None = None,
    validate: bool = True,
    required: Sequence[str] = NEQUIP_REQUIRED,
) -> Frames:
    """Read a nequip-style ``.npz``: one system size, F frames of N atoms.

    Keys (canonical name: keys looked for, see `NEQUIP_KEYS`):
      positions ``pos``/``R``/``positions`` [F,N,3]; numbers ``atomic_numbers``/``z``/``numbers`` [N] or
      [F,N]; energy ``energy``/``E`` [F] or [F,1]; forces ``forces``/``F``/``force`` [F,N,3];
      cell [3,3] or [F,3,3] (absent: zeros); pbc [3] or [F,3] (absent: non-periodic);
      optional stress [F,3,3]/[F,9]/[F,6] (ASE sign) or virial (stress = -virial/volume).

    Args:
      pbc: overrides the file's periodicity flags (bool or [3]); e.g. ``pbc=False`` for molecules
        stored in fake periodic boxes. The cell is kept either way.
      keys: overrides of the key map, canonical name -> file key (or list of candidate keys, or
        None to ignore that quantity), e.g. ``keys={"energy": "U0"}``.
      validate: run `Frames.validate` (errors name the file and the file's frame numbers).
      required: canonical names that must be present.

    Raises:
      DataError naming the file (and key) for a missing required key, a truncated or corrupt file,
      inconsistent shapes, or a validation failure.
    """
    path = Path(path)
    file = str(path)
    keymap: dict[str, tuple[str, ...]] = dict(NEQUIP_KEYS)
    for name, val in (keys or {}).items():
        if name not in NEQUIP_KEYS:
            raise ValueError(f"unknown quantity {name!r} in keys=; known: {', '.join(NEQUIP_KEYS)}")
        keymap[name] = () if val is None else ((val,) if isinstance(val, str) else tuple(val))

    z = _open_npz(path)
    with z:
        present = list(z.files)
        found: dict[str, str] = {}
        for name, candidates in keymap.items():
            for k in candidates:
                if k in present:
                    found[name] = k
                    break
        for name in required:
            if name not in found:
                cand = keymap.get(name, ())
                looked = ", ".join(f"'{c}'" for c in cand) if cand else "(no key: disabled in keys=)"
                raise DataError(
                    f"missing required array '{name}' (looked for {looked}); keys present: {_present(present)}",
                    file=file, key=cand[0] if cand else name,
                )
        arr = {name: _npz_array(z, k, file) for name, k in found.items()}

    pos = arr["positions"]
    if pos.ndim != 3 or pos.shape[-1] != 3:
        raise DataError(f"positions must have shape [frames, atoms, 3], got {pos.shape}", file=file, key=found["positions"])
    F, N, _ = pos.shape

    file_pbc = arr.get("pbc")
    use_pbc = file_pbc if pbc is None else pbc
    if use_pbc is not None:
        use_pbc = np.asarray(use_pbc, dtype=bool)
        if use_pbc.ndim == 0:
            use_pbc = np.full(3, bool(use_pbc))

    cell = arr.get("cell")
    if cell is not None:
        cell = np.asarray(cell, dtype=np.float64)
        if cell.shape in ((9,), (F, 9)):
            cell = cell.reshape(cell.shape[:-1] + (3, 3))
        if cell.shape not in ((3, 3), (F, 3, 3)):
            raise DataError(f"cell has shape {cell.shape}, expected (3, 3) or ({F}, 3, 3)", file=file, key=found["cell"])

    stress = arr.get("stress")
    if stress is None and "virial" in arr:
        cellF = np.broadcast_to(cell if cell is not None else np.zeros((3, 3)), (F, 3, 3))
        virial = np.asarray(arr["virial"], dtype=np.float64)
        if virial.shape[0] != F:
            raise DataError(f"virial has {virial.shape[0]} frames, positions have {F}", file=file, key=found["virial"])
        stress = virial_to_stress(virial, cellF, file=file, key=found["virial"])

    # Shape errors inside from_arrays name the canonical key; name the file's key instead.
    for name in ("energy", "forces", "numbers"):
        a = arr.get(name)
        if a is None:
            continue
        if a.shape[:1] != (F,) and not (name == "numbers" and a.ndim == 1):
            raise DataError(f"{name} has shape {a.shape} ({a.shape[:1]} frames), positions have {pos.shape} ({F} frames)",
                            file=file, key=found[name])
    numbers = arr["numbers"]
    if numbers.shape not in ((N,), (F, N)):
        raise DataError(f"atomic numbers have shape {numbers.shape}, positions {pos.shape} imply ({N},) or ({F}, {N})",
                        file=file, key=found["numbers"])
    if "forces" in arr and arr["forces"].shape != pos.shape:
        raise DataError(f"forces have shape {arr['forces'].shape}, positions have {pos.shape}", file=file, key=found["forces"])

    frames = Frames.from_arrays(
        positions=pos,
        numbers=arr["numbers"],
        cell=cell,
        pbc=use_pbc,
        energy=arr.get("energy"),
        forces=arr.get("forces"),
        stress=stress,
        info={"format": "nequip-npz", "files": [file]},
        file=file,
        validate=validate,
    )
    return frames


# --------------------------------------------------------------------------------------------
# DeePMD-kit npy
# --------------------------------------------------------------------------------------------
def _read_raw(path: Path, what: str, hint: str = "") -> list[str]:
    if not path.is_file():
        raise DataError(f"missing: a DeePMD-kit system needs {what}{hint}", file=str(path))
    try:
        return path.read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what}: {e}", file=str(path)) from None


def _load_npy(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(
            "missing: every set.* directory needs coord.npy, box.npy (unless the system has a 'nopbc' marker), "
            "energy.npy and force.npy",
            file=str(path), key=key,
        )
    try:
        a = np.load(path, allow_pickle=False)
    except _CORRUPT as e:
        raise DataError(f"not a readable .npy array ({_why(e)}); truncated or corrupt", file=str(path), key=key) from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
        raise DataError(f"expected a numeric array, got {type(a).__name__} {getattr(a, 'dtype', '')}", file=str(path), key=key)
    return a


def _per_frame(a: np.ndarray, path: Path, key: str, F: int, width: int, what: str) -> np.ndarray:
    """Reshape [F, width] / [F, ...] data, checking the frame count and the per-frame size."""
    if a.ndim == 0 or a.shape[0] != F:
        n = a.shape[0] if a.ndim else "no"
        raise DataError(f"has {n} frames (shape {a.shape}) but coord.npy has {F}", file=str(path), key=key)
    per = int(np.prod(a.shape[1:])) if a.ndim > 1 else 1
    if per != width:
        raise DataError(f"has {per} values per frame (shape {a.shape}), expected {width} ({what})", file=str(path), key=key)
    return a.reshape(F, width).astype(np.float64)


def read_deepmd(
    path,
    type_map: Sequence[str] | None = None,
    validate: bool = True,
    required: Sequence[str] = ("energy", "force"),
) -> Frames:
    """Read one DeePMD-kit "npy" system directory.

    Layout: ``type.raw`` (one type index per atom), ``type_map.raw`` (element symbol per type index),
    and ``set.*/`` directories (read in sorted order) with ``coord.npy`` [F,3N] (Å),
    ``force.npy`` [F,3N] (eV/Å), ``energy.npy`` [F] (eV), ``box.npy`` [F,9] (row-major cell, rows are
    lattice vectors, Å) and optional ``virial.npy`` [F,9] (eV). A ``nopbc`` marker file in the system
    directory makes it non-periodic (then ``box.npy`` may be absent); otherwise periodic in x, y, z.

    Stress sign convention: DeePMD-kit's virial is W = -dE/dε, so the returned stress (ASE/nequip
    convention, σ = (1/V) dE/dε, eV/Å³) is ``stress = -virial / |det(box)|``. Positive pressure
    (P = -tr σ / 3 = tr W / 3V > 0) means the cell wants to expand.

    Each set becomes frames with ``source = "<dir>/set.NNN#<frame in the set>"``.

    Args:
      type_map: element symbols by type index, used when the directory has no ``type_map.raw``
        (DeePMD-kit then takes it from the training input); also overrides one that is present.
      validate: run `Frames.validate`.
      required: which labels each set must have (``"energy"``, ``"force"``, ``"virial"``).

    Raises:
      DataError naming the file and key for a missing file, a frame count or atom count that does
      not agree with coord.npy / type.raw, unknown elements, or a validation failure.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a directory: a DeePMD-kit system is a directory with type.raw and set.*/", file=str(root))
    numbers, type_map = _deepmd_atomic_numbers(root, type_map)
    periodic = not (root / "nopbc").exists()
    sets = sorted(p for p in root.glob("set.*") if p.is_dir())
    if not sets:
        raise DataError("no set.* directories: a DeePMD-kit system keeps its frames in set.000/, set.001/, ...", file=str(root))
    has_virial = [(s / "virial.npy").is_file() for s in sets]
    if any(has_virial) and not all(has_virial):
        s = sets[has_virial.index(False)]
        raise DataError(
            f"missing, but {sets[has_virial.index(True)].name}/virial.npy exists: all sets must carry the same labels",
            file=str(s / "virial.npy"), key="virial",
        )
    parts = [_read_deepmd_set(s, numbers, periodic, required, validate) for s in sets]
    frames = Frames.concatenate(parts, info={"format": "deepmd", "files": [str(root)], "type_map": type_map})
    return frames


def _deepmd_atomic_numbers(root: Path, type_map: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Atomic number of every atom (type.raw through the type map) and the type map used."""
    from ase.data import atomic_numbers as z_of

    type_file = root / "type.raw"
    tokens = _read_raw(type_file, "type.raw (the type index of every atom)")
    try:
        types = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        raise DataError("type.raw must hold one integer type index per atom", file=str(type_file)) from None
    if len(types) == 0:
        raise DataError("type.raw is empty: no atoms", file=str(type_file))
    map_file = root / "type_map.raw"
    if type_map is None:
        type_map = _read_raw(map_file, "type_map.raw (the element symbol of each type index)",
                             "; or pass type_map=[...] to read_deepmd")
    else:
        map_file = None  # given as an argument
    type_map = list(type_map)
    numbers_of_type = []
    for k, sym in enumerate(type_map):
        if sym not in z_of or z_of[sym] == 0:
            raise DataError(
                f"type_map entry {k} '{sym}' is not an element symbol" + ("" if map_file else " (type_map= argument)"),
                file=str(map_file) if map_file else str(root),
            )
        numbers_of_type.append(z_of[sym])
    if types.min() < 0 or types.max() >= len(type_map):
        a = int(np.argmax((types < 0) | (types >= len(type_map))))
        raise DataError(
            f"type index {types[a]} but type_map has {len(type_map)} entries ({', '.join(type_map)})",
            file=str(type_file), atoms=a,
        )
    return np.asarray(numbers_of_type, dtype=np.int64)[types], type_map


def _read_deepmd_set(s: Path, numbers: np.ndarray, periodic: bool, required: Sequence[str], validate: bool) -> Frames:
    """The frames of one set.* directory of a DeePMD-kit system with these atoms."""
    N = len(numbers)
    coord_path = s / "coord.npy"
    coord = _load_npy(coord_path, "coord")
    if coord.ndim < 2:
        raise DataError(f"expected shape [frames, 3*atoms], got {coord.shape}", file=str(coord_path), key="coord")
    F = coord.shape[0]
    per = int(np.prod(coord.shape[1:]))
    if per != 3 * N:
        raise DataError(
            f"has {per} values per frame (shape {coord.shape}), i.e. {per / 3:g} atoms, but type.raw lists {N} atoms",
            file=str(coord_path), key="coord",
        )
    coord = coord.reshape(F, N, 3).astype(np.float64)

    def optional(name, key, width, what):
        p = s / name
        if not p.is_file():
            if key in required:
                _load_npy(p, key)  # raises "missing"
            return None
        return _per_frame(_load_npy(p, key), p, key, F, width, what)

    energy = optional("energy.npy", "energy", 1, "one energy per frame")
    force = optional("force.npy", "force", 3 * N, f"3 x {N} atoms of type.raw")
    box_path = s / "box.npy"
    if box_path.is_file() or periodic:
        box = _per_frame(_load_npy(box_path, "box"), box_path, "box", F, 9, "a row-major 3x3 cell").reshape(F, 3, 3)
    else:
        box = np.zeros((F, 3, 3))
    virial = optional("virial.npy", "virial", 9, "a row-major 3x3 virial")
    stress = None
    if virial is not None:
        for f in range(F):  # a cell without volume is box.npy's fault, not virial.npy's
            check_cell(box[f], np.full(3, periodic), file=str(box_path), frame=f, key="box")
        stress = virial_to_stress(virial, box, file=str(s / "virial.npy"), key="virial")
    return Frames.from_arrays(
        positions=coord,
        numbers=numbers,
        cell=box,
        pbc=np.full(3, periodic),
        energy=None if energy is None else energy[:, 0],
        forces=None if force is None else force.reshape(F, N, 3),
        stress=stress,
        file=str(s),
        validate=validate,
    )


# --------------------------------------------------------------------------------------------
# ASE
# --------------------------------------------------------------------------------------------
def _resolve_index(index) -> tuple[Any, Any]:
    """(index to pass to ase.io.read, python index to apply afterwards or None).

    ASE numbers frames from the start of the file only for non-negative indices; for negative ones
    we read everything and select here, so that every frame keeps its number in the file."""
    from ase.io.formats import string2index

    idx = string2index(index) if isinstance(index, str) else index
    if isinstance(idx, (int, np.integer)):
        return (int(idx), None) if idx >= 0 else (":", int(idx))
    if isinstance(idx, slice):
        if all(v is None or v >= 0 for v in (idx.start, idx.stop)) and (idx.step is None or idx.step > 0):
            return idx, None
        return (":", idx)
    raise ValueError(f"index must be an int, a slice or a string like ':' or '2:10:2', got {index!r}")


def _ase_label(atoms, key: str, where: str):
    """Label `key` from the calculator results, else from atoms.info / atoms.arrays."""
    calc = getattr(atoms, "calc", None)
    results = getattr(calc, "results", None) or {}
    if results.get(key) is not None:
        return results[key]
    store = atoms.arrays if where == "arrays" else atoms.info
    return store.get(key)


def _label_array(value, key: str, file: str, frame) -> np.ndarray:
    """An ASE label as float64; a label that is not numeric (e.g. ``energy=abc``) names its key and frame."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"label {value!r} is not a number", file=file, key=key, frame=frame) from None


def _ase_frame_labels(atoms, keys: Mapping[str, str], file: str, frame) -> tuple:
    """(energy or None, forces or None, 3x3 stress or None) of one ASE frame; `keys` maps label -> ASE key."""
    e = _ase_label(atoms, keys["energy"], "info")
    if e is not None:
        e = _label_array(e, keys["energy"], file, frame).reshape(-1)
        if e.size != 1:
            raise DataError(f"energy label has {e.size} values, expected one", file=file, key=keys["energy"], frame=frame)
        e = float(e[0])
    f = _ase_label(atoms, keys["forces"], "arrays")
    f = None if f is None else _label_array(f, keys["forces"], file, frame)
    s = _ase_label(atoms, keys["stress"], "info")
    if s is not None:
        s = _label_array(s, keys["stress"], file, frame)
        s = voigt_to_full(s) if s.shape == (6,) else s.reshape(3, 3) if s.size == 9 else s
    else:
        v = _ase_label(atoms, keys["virial"], "info")
        if v is not None:
            v = _label_array(v, keys["virial"], file, frame)
            s = virial_to_stress(v.reshape(1, -1) if v.size in (6, 9) else v[None], np.asarray(atoms.cell)[None],
                                 file=file, key=keys["virial"], frames=[frame])[0]
    return e, f, s


def read_ase(
    path,
    index=":",
    format: str | None = None,
    validate: bool = True,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    virial_key: str = "virial",
) -> Frames:
    """Read anything `ase.io.read` reads (extxyz, ASE db, trajectory, ...) into `Frames`.

    Labels come from the attached calculator's results (``atoms.calc.results[key]``), else from
    ``atoms.info[energy_key]`` / ``atoms.arrays[forces_key]`` / ``atoms.info[stress_key]`` (3x3,
    9 or Voigt 6, ASE sign); a ``virial`` (eV, info or results) gives stress = -virial/volume when
    there is no stress. Note: the ``energy`` result is used, not ``free_energy``.

    Frames may have different atom counts. A label must be on all frames or on none; otherwise a
    DataError names the first frame without it. ``source`` records each frame's number in the
    file (for ``index='5:'`` the first frame is ``path#5``).

    Args:
      index: ASE index (``':'``, ``'-10:'``, ``3``, ``slice(...)``).
      format: ASE format name, if the file name does not tell it.
    """
    import ase.io

    path = Path(path) if not isinstance(path, Path) else path
    file = str(path)
    if not path.exists():
        raise DataError("no such file", file=file)
    read_index, post = _resolve_index(index)
    try:
        images = ase.io.read(path, index=read_index, format=format)
    except Exception as e:  # ASE raises many types (UnknownFileTypeError, StopIteration, ValueError, ...)
        raise DataError(f"ase.io.read failed ({_why(e)})", file=file) from None
    if not isinstance(images, list):
        images = [images]
    # Frame numbers within the file.
    if post is not None:
        numbers_in_file = list(range(len(images)))
        if isinstance(post, int):
            if not -len(images) <= post < len(images):
                raise DataError(f"index {index!r} out of range for {len(images)} frames", file=file)
            numbers_in_file, images = [numbers_in_file[post]], [images[post]]
        else:
            numbers_in_file, images = numbers_in_file[post], images[post]
    elif isinstance(read_index, int):
        numbers_in_file = [read_index]
    else:
        start, step = read_index.start or 0, read_index.step or 1
        numbers_in_file = [start + step * k for k in range(len(images))]
    if not images:
        raise DataError(f"no frames for index {index!r}", file=file)

    keys = dict(energy=energy_key, forces=forces_key, stress=stress_key, virial=virial_key)
    labels = [_ase_frame_labels(atoms, keys, file, fk) for atoms, fk in zip(images, numbers_in_file)]
    energies, forces, stresses = (list(v) for v in zip(*labels))

    for key, vals in (("energy", energies), ("forces", forces), ("stress", stresses)):
        have = [v is not None for v in vals]
        if any(have) and not all(have):
            k = have.index(False)
            raise DataError(
                f"this frame has no {key} label but frame {numbers_in_file[have.index(True)]} has one: "
                "all frames must carry the same labels",
                file=file, key=key, frame=numbers_in_file[k],
            )

    for k, atoms in enumerate(images):
        n = len(atoms)
        fk = numbers_in_file[k]
        if forces[k] is not None and forces[k].shape != (n, 3):
            raise DataError(f"forces have shape {forces[k].shape}, the frame has {n} atoms", file=file, key="forces", frame=fk)
        if stresses[k] is not None and stresses[k].shape != (3, 3):
            raise DataError(f"stress has shape {stresses[k].shape}, expected 3x3, 9 or Voigt 6", file=file, key="stress", frame=fk)
    parts = _labelled_frames(images, energies, forces, stresses)
    frames = Frames.concatenate(parts, info={"format": format or "ase", "files": [file]})
    frames = frames.replace(source=_file_frame_sources(file, numbers_in_file))
    if validate:
        frames.validate(file=file)
    return frames


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
_NEQUIP_NAMES = {"nequip", "nequip-npz", "nequip_npz", "npz"}
_DEEPMD_NAMES = {"deepmd", "deepmd-npy", "deepmd/npy", "deepmd_npy", "dpdata"}


def read(path, format: str | None = None, **kw) -> Frames:
    """Read any supported dataset; `format` as in the data cards (``nequip-npz``, ``deepmd``) or
    an ASE format name. Without `format`: a directory with ``type.raw`` is a DeePMD-kit system, a
    directory whose subdirectories hold DeePMD-kit systems is read as all of them (sorted, one
    `Frames`), ``*.npz`` is nequip, anything else goes to `ase.io.read` if ASE recognises it.
    Keyword arguments go to the reader."""
    path = Path(path)
    file = str(path)
    if format is not None:
        name = format.lower()
        if name in _NEQUIP_NAMES:
            return read_nequip_npz(path, **kw)
        if name in _DEEPMD_NAMES:
            return read_deepmd(path, **kw)
        from ase.io.formats import ioformats

        if name not in ioformats or not ioformats[name].can_read:
            raise DataError(
                f"unsupported format {format!r}: use 'nequip-npz', 'deepmd' or a format ase.io.read reads", file=file
            )
        return read_ase(path, format=name, **kw)
    if not path.exists():
        raise DataError("no such file or directory", file=file)
    if path.is_dir():
        if (path / "type.raw").is_file():
            return read_deepmd(path, **kw)
        systems = sorted(p.parent for p in path.rglob("type.raw"))
        if systems:
            parts = [read_deepmd(s, **kw) for s in systems]
            return Frames.concatenate(parts, info={"format": "deepmd", "files": [str(s) for s in systems]})
        raise DataError(
            "directory is not a dataset: no type.raw (DeePMD-kit system) in it or below it; pass format= for "
            "other directory formats",
            file=file,
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return read_nequip_npz(path, **kw)
    if suffix == ".npy":
        raise DataError(
            "a single .npy array is not a dataset; read the DeePMD-kit system directory (the one with type.raw) instead",
            file=file,
        )
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    try:
        fmt = filetype(file, guess=False)
    except (UnknownFileTypeError, OSError) as e:
        raise DataError(f"unsupported or unrecognised file format ({e}); pass format=", file=file) from None
    if fmt not in ioformats or not ioformats[fmt].can_read:
        raise DataError(f"unsupported file format {fmt!r}", file=file)
    return read_ase(path, format=fmt, **kw)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _extxyz_frame(fr: dict[str, Any]) -> str:
    """One frame in extended XYZ, numbers written exactly (shortest round-trip repr)."""
    from ase.data import chemical_symbols
    from ase.io.extxyz import key_val_dict_to_str

    n = len(fr["numbers"])
    cols = [("species", "S", 1), ("pos", "R", 3)]
    if "forces" in fr:
        cols.append(("forces", "R", 3))
    head = []
    cell = np.asarray(fr["cell"], dtype=np.float64)
    if cell.any():
        head.append('Lattice="' + " ".join(repr(float(x)) for x in cell.reshape(9)) + '"')
    head.append("Properties=" + ":".join(f"{a}:{b}:{c}" for a, b, c in cols))
    info: dict[str, Any] = {}
    if "energy" in fr:
        info["energy"] = float(fr["energy"])
    if "stress" in fr:
        info["stress"] = np.asarray(fr["stress"], dtype=np.float64)
    info["pbc"] = np.asarray(fr["pbc"], dtype=bool)
    head.append(key_val_dict_to_str(info))
    lines = [str(n), " ".join(head)]
    pos = np.asarray(fr["positions"], dtype=np.float64).tolist()
    frc = np.asarray(fr["forces"], dtype=np.float64).tolist() if "forces" in fr else None
    for a, z in enumerate(fr["numbers"]):
        row = pos[a] + (frc[a] if frc is not None else [])
        lines.append(f"{chemical_symbols[int(z)]:<2s} " + " ".join(repr(x) for x in row))
    return "\n".join(lines) + "\n"


def write_extxyz(frames: Frames, path, exact: bool = True) -> Path:
    """Write `frames` as extended XYZ with energy, forces and stress (ASE's keys and sign), atomically
    (a temporary file in the same directory, then `os.replace`).

    `ase.io.write(format='extxyz')` rounds per-atom columns (positions, forces) to 8 decimals
    (``%16.8f``). With ``exact=True`` (default) the per-atom lines are written with the shortest
    repr that round-trips float64 exactly, in the same extxyz layout (the comment line is built
    with ASE's own `key_val_dict_to_str`), so `read_ase` / `ase.io.read` give back identical arrays.
    ``exact=False`` writes through `ase.io.write` unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if exact:
                for i in range(len(frames)):
                    f.write(_extxyz_frame(frames.frame(i)))
            else:
                import ase.io

                ase.io.write(f, frames.to_ase(), format="extxyz")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _labelled_frames(images, energies, forces, stresses) -> list[Frames]:
    """One unvalidated `Frames` per image with the given labels (None entries: no label)."""
    return [
        Frames.from_arrays(
            positions=atoms.get_positions()[None],
            numbers=atoms.get_atomic_numbers(),
            cell=np.asarray(atoms.cell)[None],
            pbc=atoms.get_pbc(),
            energy=None if energies[k] is None else [energies[k]],
            forces=None if forces[k] is None else np.asarray(forces[k])[None],
            stress=None if stresses[k] is None else stresses[k][None],
            validate=False,
        )
        for k, atoms in enumerate(images)
    ]


def frames_from_atoms(images, validate: bool = True) -> Frames:
    """`ase.Atoms` (one or a list) as `Frames`; labels from attached calculators are kept when every
    image carries them (energy, forces, stress)."""
    images = [images] if not isinstance(images, (list, tuple)) else list(images)
    if not images:
        raise DataError("no atoms given")

    def label(atoms, key):
        results = getattr(getattr(atoms, "calc", None), "results", None) or {}
        return results.get(key)

    def stress(atoms):
        s = np.asarray(label(atoms, "stress"), dtype=np.float64)
        return voigt_to_full(s) if s.shape == (6,) else s.reshape(3, 3)

    keep = {k: all(label(a, k) is not None for a in images) for k in ("energy", "forces", "stress")}
    energies = [float(label(a, "energy")) if keep["energy"] else None for a in images]
    forces = [label(a, "forces") if keep["forces"] else None for a in images]
    stresses = [stress(a) if keep["stress"] else None for a in images]
    parts = _labelled_frames(images, energies, forces, stresses)
    frames = Frames.concatenate(parts) if len(parts) > 1 else parts[0]
    return frames.validate() if validate else frames
