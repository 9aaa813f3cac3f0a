"""`Frames`: a set of labelled atomic configurations of possibly different sizes.

Frames are stored ragged (atoms of all frames concatenated, with per-frame counts), the layout jraph
and MACE use: one contiguous array per quantity, cheap slicing, no padding until a batch is built
(`jaxbench.graph` decides padding, in one place).

Units: positions and cell in Å, energy in eV (total, not per atom), forces in eV/Å, stress in eV/Å³
with ASE's sign convention (stress = (1/V) dE/dstrain; positive = the cell wants to shrink).
Cell vectors are the ROWS of `cell` (ASE convention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import DataError

MIN_DISTANCE = 0.1  # Å; two atoms closer than this are a corrupt record, not physics


@dataclasses.dataclass(frozen=True, eq=False)
class Frames:
    """Ragged batch of frames.

    Attributes:
      positions: [A, 3] float64, A = total atoms over all frames.
      numbers: [A] int, atomic numbers.
      n_atoms: [F] int, atoms per frame.
      cell: [F, 3, 3] float64, rows are lattice vectors (zeros for a molecule).
      pbc: [F, 3] bool.
      energy: [F] float64 or None.
      forces: [A, 3] float64 or None.
      stress: [F, 3, 3] float64 or None (ASE sign convention, eV/Å³).
      info: metadata (dataset name, split, units, source files ...).
      source: [F] str-able identifiers "file#frame" for error messages; optional.
    """

    positions: np.ndarray
    numbers: np.ndarray
    n_atoms: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: np.ndarray | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: np.ndarray | None = None

    # -- basic container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.n_atoms.shape[0])

    @property
    def offsets(self) -> np.ndarray:
        """[F+1] start index of each frame's atoms in the ragged arrays."""
        return np.concatenate([[0], np.cumsum(self.n_atoms)]).astype(np.int64)

    @property
    def n_frames(self) -> int:
        return len(self)

    @property
    def species(self) -> np.ndarray:
        """Sorted unique atomic numbers present."""
        return np.unique(self.numbers)

    @property
    def has_stress(self) -> np.ndarray:
        """[F] bool: frames with a stress label (an all-NaN stress marks a frame without one)."""
        if self.stress is None:
            return np.zeros(len(self), bool)
        return np.isfinite(self.stress.reshape(len(self), -1)).all(axis=-1)

    @property
    def frame_index(self) -> np.ndarray:
        """[A] frame index of every atom."""
        return np.repeat(np.arange(len(self)), self.n_atoms)

    def atom_slice(self, i: int) -> slice:
        off = self.offsets
        return slice(int(off[i]), int(off[i + 1]))

    def frame(self, i: int) -> dict[str, Any]:
        """One frame as a dict of arrays (positions [N,3], numbers [N], cell, pbc, energy, ...)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame {i} out of range for {len(self)} frames")
        i = i % len(self)
        s = self.atom_slice(i)
        out = {
            "positions": self.positions[s],
            "numbers": self.numbers[s],
            "cell": self.cell[i],
            "pbc": self.pbc[i],
        }
        if self.energy is not None:
            out["energy"] = float(self.energy[i])
        if self.forces is not None:
            out["forces"] = self.forces[s]
        if self.stress is not None and self.has_stress[i]:
            out["stress"] = self.stress[i]
        return out

    def __getitem__(self, index) -> "Frames":
        """Select frames by int, slice, index array or boolean mask; returns `Frames`."""
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        off = self.offsets
        atom_idx = (
            np.concatenate([np.arange(off[i], off[i + 1]) for i in idx]) if len(idx) else np.zeros(0, np.int64)
        )
        take = lambda a, ii: None if a is None else a[ii]  # noqa: E731
        return Frames(
            positions=self.positions[atom_idx],
            numbers=self.numbers[atom_idx],
            n_atoms=self.n_atoms[idx],
            cell=self.cell[idx],
            pbc=self.pbc[idx],
            energy=take(self.energy, idx),
            forces=take(self.forces, atom_idx),
            stress=take(self.stress, idx),
            info=dict(self.info),
            source=take(self.source, idx),
        )

    def __repr__(self) -> str:
        n = self.n_atoms
        sizes = f"{n.min()}" if len(n) and n.min() == n.max() else (f"{n.min()}-{n.max()}" if len(n) else "0")
        labels = [k for k in ("energy", "forces", "stress") if getattr(self, k) is not None]
        name = self.info.get("dataset", "")
        split = self.info.get("split", "")
        tag = f" {name}/{split}" if name else ""
        return f"<Frames{tag}: {len(self)} frames, {sizes} atoms, labels={labels}>"

    # -- construction ------------------------------------------------------------------------
    @staticmethod
    def from_arrays(
        positions,
        numbers,
        cell=None,
        pbc=None,
        energy=None,
        forces=None,
        stress=None,
        info=None,
        file=None,
        validate: bool = True,
    ) -> "Frames":
        """Build from dense per-frame arrays of one system size: positions [F,N,3], numbers [N] or
        [F,N], cell [3,3] or [F,3,3], pbc [3] or [F,3], energy [F] or [F,1], forces [F,N,3],
        stress [F,3,3] or [F,9] or [F,6] (Voigt xx,yy,zz,yz,xz,xy)."""
        where = dict(file=file)
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim != 3 or positions.shape[-1] != 3:
            raise DataError(f"positions must have shape [frames, atoms, 3], got {positions.shape}", key="positions", **where)
        F, N, _ = positions.shape
        numbers = np.asarray(numbers)
        if numbers.ndim == 1:
            numbers = np.broadcast_to(numbers, (F, numbers.shape[0]))
        if numbers.shape != (F, N):
            raise DataError(
                f"atomic numbers have shape {numbers.shape}, positions imply ({N},) or ({F}, {N})", key="numbers", **where
            )
        if cell is None:
            cell = np.zeros((3, 3))
        cell = np.asarray(cell, dtype=np.float64)
        if cell.shape == (9,) or (cell.ndim == 2 and cell.shape[-1] == 9):
            cell = cell.reshape(cell.shape[:-1] + (3, 3))
        if cell.shape == (3, 3):
            cell = np.broadcast_to(cell, (F, 3, 3))
        if cell.shape != (F, 3, 3):
            raise DataError(f"cell has shape {cell.shape}, expected (3, 3) or ({F}, 3, 3)", key="cell", **where)
        if pbc is None:
            pbc = np.zeros(3, bool)
        pbc = np.asarray(pbc, dtype=bool)
        if pbc.shape == (3,):
            pbc = np.broadcast_to(pbc, (F, 3))
        if pbc.shape == ():
            pbc = np.full((F, 3), bool(pbc))
        if pbc.shape != (F, 3):
            raise DataError(f"pbc has shape {pbc.shape}, expected (3,) or ({F}, 3)", key="pbc", **where)
        if energy is not None:
            energy = np.asarray(energy, dtype=np.float64)
            if energy.shape == (F, 1):
                energy = energy[:, 0]
            if energy.shape != (F,):
                raise DataError(f"energy has shape {energy.shape}, expected ({F},) or ({F}, 1) for {F} frames", key="energy", **where)
        if forces is not None:
            forces = np.asarray(forces, dtype=np.float64)
            if forces.shape != (F, N, 3):
                raise DataError(f"forces have shape {forces.shape}, positions have {positions.shape}", key="forces", **where)
            forces = forces.reshape(F * N, 3)
        if stress is not None:
            stress = np.asarray(stress, dtype=np.float64)
            if stress.shape == (F, 9):
                stress = stress.reshape(F, 3, 3)
            elif stress.shape == (F, 6):
                stress = voigt_to_full(stress)
            if stress.shape != (F, 3, 3):
                raise DataError(f"stress has shape {stress.shape}, expected ({F}, 3, 3), ({F}, 9) or ({F}, 6)", key="stress", **where)
        source = None
        if file is not None:
            source = np.array([f"{file}#{i}" for i in range(F)], dtype=object)
        frames = Frames(
            positions=np.ascontiguousarray(positions.reshape(F * N, 3)),
            numbers=np.ascontiguousarray(numbers.reshape(F * N)).astype(np.int32),
            n_atoms=np.full(F, N, dtype=np.int64),
            cell=np.ascontiguousarray(cell),
            pbc=np.ascontiguousarray(pbc),
            energy=energy,
            forces=forces,
            stress=stress,
            info=dict(info or {}),
            source=source,
        )
        if validate:
            frames.validate(file=file)
        return frames

    @staticmethod
    def concatenate(parts: list["Frames"], info=None) -> "Frames":
        if not parts:
            raise ValueError("nothing to concatenate")

        def cat(name):
            vals = [getattr(p, name) for p in parts]
            if name == "stress" and any(v is not None for v in vals) and any(v is None for v in vals):
                # Mixed labels (e.g. molecules + crystals): frames without a stress label get NaN,
                # which marks "absent" (see `has_stress`), never a value.
                vals = [np.full((len(p), 3, 3), np.nan) if v is None else v for p, v in zip(parts, vals)]
            if name == "source" and any(v is not None for v in vals):
                vals = [np.array([f"#{i}" for i in range(len(p))], dtype=object) if v is None else v
                        for p, v in zip(parts, vals)]
            if any(v is None for v in vals):
                if any(v is not None for v in vals):
                    raise DataError(f"cannot concatenate frames with and without {name} labels", key=name)
                return None
            return np.concatenate(vals, axis=0)

        return Frames(
            positions=cat("positions"),
            numbers=cat("numbers"),
            n_atoms=cat("n_atoms"),
            cell=cat("cell"),
            pbc=cat("pbc"),
            energy=cat("energy"),
            forces=cat("forces"),
            stress=cat("stress"),
            info=dict(info if info is not None else parts[0].info),
            source=cat("source"),
        )

    def with_info(self, **kw) -> "Frames":
        info = dict(self.info)
        info.update(kw)
        return dataclasses.replace(self, info=info)

    def replace(self, **kw) -> "Frames":
        return dataclasses.replace(self, **kw)

    # -- validation --------------------------------------------------------------------------
    def _where(self, i: int, file=None) -> dict[str, Any]:
        """Best location info for frame i: the source file and that file's own frame index."""
        if self.source is not None:
            src = str(self.source[i])
            f, _, k = src.rpartition("#")
            return dict(file=f, frame=int(k) if k.isdigit() else k)
        return dict(file=file, frame=i)

    def validate(self, file=None, min_distance: float = MIN_DISTANCE) -> "Frames":
        """Check finite values, cells, and that no two atoms are closer than `min_distance` Å.

        Raises `DataError` naming the file, key, frame and atom(s) at fault.
        """
        off = self.offsets
        atom_frame = self.frame_index
        for key in ("positions", "forces"):
            a = getattr(self, key)
            if a is None:
                continue
            bad = ~np.isfinite(a).all(axis=-1)
            if bad.any():
                k = int(np.argmax(bad))
                f = int(atom_frame[k])
                raise DataError(f"non-finite value {a[k].tolist()}", key=key, atoms=int(k - off[f]), **self._where(f, file))
        for key in ("energy", "stress", "cell"):
            a = getattr(self, key)
            if a is None:
                continue
            flat = a.reshape(len(self), -1)
            bad = ~np.isfinite(flat).all(axis=-1)
            if key == "stress":
                bad &= ~np.isnan(flat).all(axis=-1)  # an all-NaN stress means "no stress label"
            if bad.any():
                f = int(np.argmax(bad))
                raise DataError(f"non-finite value {a[f].tolist()}", key=key, **self._where(f, file))
        if (self.numbers < 1).any() or (self.numbers > 118).any():
            k = int(np.argmax((self.numbers < 1) | (self.numbers > 118)))
            f = int(atom_frame[k])
            raise DataError(f"atomic number {self.numbers[k]} is not an element", key="numbers", atoms=int(k - off[f]), **self._where(f, file))
        for f in range(len(self)):
            check_cell(self.cell[f], self.pbc[f], **self._where(f, file))
        self._check_min_distance(min_distance, file)
        return self

    def _check_min_distance(self, min_distance: float, file=None) -> None:
        from .neighbors import neighbor_pairs

        periodic = self.pbc.any(axis=1)
        # Molecules: dense pairwise distances, vectorised over frames of one size (MD17, 3BPA: ~1e4
        # frames load in well under a second). Periodic frames need images: one neighbour search each.
        off = self.offsets
        for n in np.unique(self.n_atoms[~periodic]):
            frames_n = np.flatnonzero((~periodic) & (self.n_atoms == n))
            if n < 2:
                continue
            iu = np.triu_indices(n, 1)
            for chunk in np.array_split(frames_n, max(1, len(frames_n) * n * n // 4_000_000 + 1)):
                if not len(chunk):
                    continue
                pos = np.stack([self.positions[off[f] : off[f] + n] for f in chunk])
                d = np.linalg.norm(pos[:, :, None, :] - pos[:, None, :, :], axis=-1)[:, iu[0], iu[1]]
                bad = d.min(axis=1) < min_distance
                if bad.any():
                    c = int(np.argmax(bad))
                    k = int(np.argmin(d[c]))
                    self._raise_close(int(chunk[c]), int(iu[0][k]), int(iu[1][k]), float(d[c, k]), min_distance, file)
        for f in np.flatnonzero(periodic):
            s = self.atom_slice(f)
            pos = self.positions[s]
            i, j, _, d = neighbor_pairs(pos, self.cell[f], self.pbc[f], min_distance)
            if len(i):
                k = int(np.argmin(d))
                a, b = sorted((int(i[k]), int(j[k])))
                self._raise_close(int(f), a, b, float(d[k]), min_distance, file)

    def _raise_close(self, f: int, a: int, b: int, d: float, min_distance: float, file=None):
        zs = self.numbers[self.atom_slice(f)]
        raise DataError(
            f"atoms {a} (Z={zs[a]}) and {b} (Z={zs[b]}) are {d:.4f} Å apart, closer than {min_distance} Å",
            key="positions",
            **self._where(f, file),
        )

    # -- interop -----------------------------------------------------------------------------
    def to_ase(self, i: int | None = None):
        """One frame (or a list of all frames) as `ase.Atoms` with a SinglePointCalculator."""
        if i is None:
            return [self.to_ase(k) for k in range(len(self))]
        import ase
        from ase.calculators.singlepoint import SinglePointCalculator

        fr = self.frame(i)
        atoms = ase.Atoms(numbers=fr["numbers"], positions=fr["positions"], cell=fr["cell"], pbc=fr["pbc"])
        results = {}
        if "energy" in fr:
            results["energy"] = fr["energy"]
            results["free_energy"] = fr["energy"]
        if "forces" in fr:
            results["forces"] = fr["forces"]
        if "stress" in fr:
            results["stress"] = full_to_voigt(fr["stress"][None])[0]
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms


def check_cell(cell, pbc, file=None, frame=None, key="cell") -> None:
    """Raise `DataError` for pbc without a cell, or a singular or left-handed periodic cell."""
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if not pbc.any():
        return
    lengths = np.linalg.norm(cell, axis=1)
    for k in np.flatnonzero(pbc):
        if lengths[k] < 1e-8:
            raise DataError(
                f"periodic along axis {k} (pbc={pbc.tolist()}) but cell vector {k} is zero: a periodic system needs a cell",
                key=key, file=file, frame=frame,
            )
    det = np.linalg.det(cell)
    if pbc.all() or abs(det) > 0:
        # Compare the volume with the product of lengths so the test is scale-free.
        scale = np.prod(np.where(lengths > 1e-8, lengths, 1.0))
        if abs(det) < 1e-8 * scale:
            raise DataError(f"cell {cell.tolist()} is singular (volume {det:.3g} Å³)", key=key, file=file, frame=frame)
        if det < 0:
            raise DataError(
                f"cell {cell.tolist()} is left-handed (determinant {det:.4g} < 0); "
                "swap two lattice vectors or negate one to make it right-handed",
                key=key, file=file, frame=frame,
            )


def voigt_to_full(v: np.ndarray) -> np.ndarray:
    """[..., 6] Voigt (xx, yy, zz, yz, xz, xy) -> [..., 3, 3] symmetric."""
    v = np.asarray(v)
    xx, yy, zz, yz, xz, xy = np.moveaxis(v, -1, 0)
    return np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2)


def full_to_voigt(s: np.ndarray) -> np.ndarray:
    """[..., 3, 3] -> [..., 6] Voigt (xx, yy, zz, yz, xz, xy)."""
    s = np.asarray(s)
    return np.stack([s[..., 0, 0], s[..., 1, 1], s[..., 2, 2], s[..., 1, 2], s[..., 0, 2], s[..., 0, 1]], -1)
