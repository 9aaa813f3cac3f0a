"""Where replicas start: positions (and optionally velocities) of R replicas of one system.

Everything here is host-side numpy, run once before anything compiles: a start the model cannot
represent, or with overlapping atoms, is refused before any compute; the molecules' bond lists the
failure criteria watch are found here from each replica's first frame.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import DataError, JaxbenchError
from ..frames import check_cell
from .potentials import EnergyModel

MIN_DISTANCE = 0.1  # Å: closer atoms in a start are an overlap, refused


@dataclasses.dataclass(frozen=True)
class Start:
    """Initial configurations of R replicas: positions [R, N, 3] Å (unwrapped), numbers [N], cell
    [3, 3] (rows), pbc [3]; optional velocities [R, N, 3] Å/fs (else Maxwell–Boltzmann from seeds)."""

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    velocities: np.ndarray | None = None
    frame_indices: tuple = ()

    @staticmethod
    def make(positions, numbers, cell=None, pbc=False, replicas: int = 1, velocities=None) -> "Start":
        pos = _array(positions, np.float64, "positions")
        if pos.ndim == 2:
            pos = np.broadcast_to(pos, (replicas, *pos.shape)).copy()
        if pos.ndim != 3 or pos.shape[2] != 3:
            raise JaxbenchError(f"positions must be [N, 3] or [R, N, 3], got {pos.shape}")
        pbc = _shaped(_array(pbc, bool, "pbc"), (3,), "pbc")
        cell = np.zeros((3, 3)) if cell is None else _array(cell, np.float64, "cell")
        if cell.shape not in ((3, 3), (9,)):
            raise DataError(f"cell has shape {cell.shape}, expected (3, 3) (rows are the lattice vectors)", key="cell")
        numbers = _array(numbers, np.int32, "numbers").reshape(-1)
        if len(numbers) != pos.shape[1]:
            raise JaxbenchError(f"{len(numbers)} atomic numbers for {pos.shape[1]} atoms")
        vel = None if velocities is None else _shaped(_array(velocities, np.float64, "velocities"), pos.shape, "velocities")
        return Start(pos, numbers, cell.reshape(3, 3), pbc, vel)

    @property
    def n_replicas(self) -> int:
        return self.positions.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[1]


def _array(value, dtype, key: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype)
    except (TypeError, ValueError) as e:
        raise DataError(f"cannot read {key} as {np.dtype(dtype).name} ({e})", key=key) from None


def _shaped(a: np.ndarray, shape: tuple, key: str) -> np.ndarray:
    """`a` broadcast to `shape` (a copy); a shape that does not broadcast names the key."""
    try:
        return np.broadcast_to(a, shape).copy()
    except ValueError:
        raise DataError(f"{key} has shape {a.shape}, which does not fit {shape}", key=key) from None


def start_from_frames(frames, replicas: int, mode: str = "velocities", index: int = 0) -> Start:
    """Replica starts from a ``Frames`` split: one frame (``index``) for every replica ('velocities'),
    or ``replicas`` distinct frames spread evenly over the split ('frames')."""
    if len(frames) == 0:
        raise DataError("no frames to start from")
    if mode == "velocities":
        idx = [index] * replicas
    else:
        if len(frames) < replicas:
            raise DataError(f"{replicas} replicas from distinct frames, but the split has only {len(frames)} frames")
        idx = np.linspace(0, len(frames) - 1, replicas).round().astype(int).tolist()
    f0 = frames.frame(idx[0])
    pos = []
    for i in idx:
        f = frames.frame(i)
        if not np.array_equal(f["numbers"], f0["numbers"]):
            raise DataError("replica start frames must have the same atoms in the same order", frame=i)
        if not np.allclose(f["cell"], f0["cell"]) or not np.array_equal(f["pbc"], f0["pbc"]):
            raise DataError("replica start frames must share one cell and pbc", frame=i)
        pos.append(f["positions"])
    return dataclasses.replace(
        Start.make(np.stack(pos), f0["numbers"], f0["cell"], f0["pbc"]), frame_indices=tuple(int(i) for i in idx)
    )


def check_start(start: Start, model: EnergyModel) -> None:
    """Raise DataError for a start the model cannot run: species it lacks, non-finite or overlapping atoms."""
    from ..neighbors import neighbor_pairs

    bad = (start.numbers < 1) | (start.numbers > 118)
    if bad.any():
        a = int(np.argmax(bad))
        raise DataError(f"atomic number {start.numbers[a]} is not an element", key="numbers", atoms=a)
    model.check(start.numbers, where="initial frame")
    for key in ("positions", "velocities"):
        x = getattr(start, key)
        if x is not None and not np.all(np.isfinite(x)):
            r, a = (int(i) for i in np.argwhere(~np.isfinite(x).all(axis=-1))[0])
            raise DataError(f"replica {r}: initial {key} are not finite: {x[r, a].tolist()}", key=key, atoms=a)
    # A singular or left-handed cell would otherwise surface from the neighbour search without naming the cell.
    check_cell(start.cell, start.pbc)
    for r in range(start.n_replicas):
        i, j, _, d = neighbor_pairs(start.positions[r], start.cell, start.pbc, MIN_DISTANCE)
        if len(i):
            k = int(np.argmin(d))
            raise DataError(
                f"initial frame of replica {r} has overlapping atoms: distance {d[k]:.4f} Å < {MIN_DISTANCE} Å",
                atoms=(int(i[k]), int(j[k])),
            )


def bonds(start: Start, factor: float = 1.2):
    """Per replica [R, B] (i, j, d0, mask) of bonded pairs (closer than factor * covalent radii sum
    in the replica's first frame; no neighbor-list skin); empty (B = 1, masked) if anything is periodic."""
    from ase.data import covalent_radii

    R = start.n_replicas
    if start.pbc.any():
        return np.zeros((R, 1), np.int32), np.zeros((R, 1), np.int32), np.ones((R, 1)), np.zeros((R, 1), bool)
    rc = covalent_radii[start.numbers]
    lists = []
    for r in range(R):
        x = start.positions[r]
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        i, j = np.nonzero(np.triu(d < factor * (rc[:, None] + rc[None, :]), k=1))
        lists.append((i, j, d[i, j]))
    B = max(1, max(len(b[0]) for b in lists))
    out = np.zeros((R, B), np.int32), np.zeros((R, B), np.int32), np.ones((R, B)), np.zeros((R, B), bool)
    for r, (i, j, d0) in enumerate(lists):
        out[0][r, : len(i)], out[1][r, : len(i)], out[2][r, : len(i)], out[3][r, : len(i)] = i, j, d0, True
    return out


def replica_keys(seed: int, n: int):
    """[n] PRNG keys, ``fold_in(PRNGKey(seed), r)``: independent of how many replicas run."""
    import jax

    base = jax.random.PRNGKey(int(seed))
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(np.arange(n))
