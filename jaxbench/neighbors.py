"""Neighbor lists: a static numpy one (datasets, batches, validation) and a jittable one for MD.

Conventions (shared by every module of jaxbench):

* Cell vectors are the ROWS of ``cell`` (ASE). ``pbc`` is a length-3 bool array. Units Å.
* A pair ``(i, j, S)`` means the vector ``D = positions[j] - positions[i] + S @ cell`` with ``S`` an
  integer image shift, exactly ASE's ``neighbor_list('ijSd')``. Both directions ``(i, j, S)`` and
  ``(j, i, -S)`` are present. An atom can neighbor itself through an image (``i == j``, ``S != 0``)
  in small cells; ``(i, i, 0)`` never appears.
* Positions may be unwrapped (outside the cell); shifts always refer to the positions as given.

Static list: :func:`neighbor_pairs` (numpy + ``scipy.spatial.cKDTree``, any cell / cutoff).

MD list: :func:`md_neighbor_list` returns ``NeighborListFns`` with ``allocate`` (host) and ``update``
(jittable, ``lax.scan``-safe). Two methods:

* ``'jax_md'``: ``jax_md.partition.neighbor_list`` (Sparse format) where the minimum image
  convention holds (``cutoff + skin < h_min / 2``) or there is no periodicity at all.
* ``'multi_image'``: a dense candidate set over all atom pairs and image shifts in ``[-n, n]^3``
  (``n_k = ceil((cutoff + skin) / h_k)``), restricted per pair to the ``ceil(2 (cutoff + skin) / h_k)``
  shifts per axis that can reach; works for any cell (small cells, mixed pbc), cost
  ``N^2 * prod_k ceil(2 (cutoff + skin) / h_k)`` per rebuild.

The list holds all pairs within ``cutoff + skin``; ``update`` rebuilds only when some atom moved more
than ``skin / 2`` since the last build. Shifts are stored relative to the unwrapped positions of the
last build; since MD positions are continuous between rebuilds they stay valid until the next one.
Callers compute ``D = R[senders] - R[receivers] + shifts @ cell`` and apply ``|D| < cutoff`` and
``mask`` themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from typing import Any, Callable

import numpy as np

from .errors import NeighborListError

__all__ = [
    "cell_heights",
    "neighbor_pairs",
    "Neighbors",
    "NeighborListFns",
    "md_neighbor_list",
    "choose_method",
    "check_overflow",
    "neighbors_to_numpy",
    "MAX_DENSE_CANDIDATES",
]

MAX_DENSE_CANDIDATES = 5e7  # N * N * (candidate shifts per pair) above which 'multi_image' refuses

# Below this many (atom, image) distance evaluations the static list uses a dense numpy distance
# matrix instead of a k-d tree (faster for a few hundred atoms: no tree construction).
_DENSE_STATIC_LIMIT = 30_000


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def cell_heights(cell) -> np.ndarray:
    """Perpendicular heights ``h_k = V / |a_l x a_m|`` of a cell whose ROWS are lattice vectors.

    Equal to ``1 / |b_k|`` with ``b_k`` the reciprocal vectors (columns of ``inv(cell)``); 0 along
    axes of a singular cell.
    """
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    volume = abs(np.linalg.det(cell))
    if volume > 1e-10 * max(np.prod(np.linalg.norm(cell, axis=1)), 1e-300):
        return 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
    cross = np.stack([np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3]) for k in range(3)])
    norms = np.linalg.norm(cross, axis=1)
    return np.where(norms > 0, volume / np.where(norms > 0, norms, 1.0), 0.0)


def _check_pbc(pbc) -> np.ndarray:
    pbc = np.asarray(pbc)
    if pbc.ndim == 0:
        pbc = np.repeat(pbc, 3)
    if pbc.shape != (3,):
        raise NeighborListError(f"pbc must be a bool or 3 bools, got shape {pbc.shape}")
    return pbc.astype(bool)


def _check_cell(cell, pbc: np.ndarray) -> np.ndarray:
    if cell is None:
        if pbc.any():
            raise NeighborListError(f"a cell is required with pbc={pbc.tolist()}")
        return np.zeros((3, 3))
    cell = np.asarray(cell, dtype=np.float64)
    if cell.size != 9:
        raise NeighborListError(f"cell must be 3x3 (rows = lattice vectors), got shape {cell.shape}")
    cell = cell.reshape(3, 3)
    if pbc.any():
        if not np.all(np.isfinite(cell)):
            raise NeighborListError(f"cell has non-finite entries: {cell.tolist()}")
        lengths = np.linalg.norm(cell, axis=1)
        volume = abs(np.linalg.det(cell))
        if lengths.min() <= 0 or volume <= 1e-10 * np.prod(lengths):
            raise NeighborListError(
                f"periodic boundary conditions (pbc={pbc.tolist()}) need a nonsingular cell; got "
                f"cell={cell.tolist()} (volume {volume:.3g} Å^3). Give every axis a nonzero, "
                "linearly independent lattice vector (a vacuum length on non-periodic axes is fine)."
            )
    return cell


def _check_positions(positions) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise NeighborListError(f"positions must have shape [N, 3], got {positions.shape}")
    if not np.all(np.isfinite(positions)):
        bad = np.unique(np.nonzero(~np.isfinite(positions))[0])
        raise NeighborListError(f"non-finite positions for atoms {bad[:10].tolist()}")
    return positions


def _check_cutoff(cutoff) -> float:
    cutoff = float(cutoff)
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise NeighborListError(f"cutoff must be a positive finite number, got {cutoff}")
    return cutoff


def _image_counts(cell: np.ndarray, pbc: np.ndarray, radius: float, heights=None) -> np.ndarray:
    """n_k = ceil(radius / h_k) images on each side along periodic axes, 0 on the others."""
    if not pbc.any():
        return np.zeros(3, dtype=np.int64)
    if heights is None:
        heights = cell_heights(cell)
    n = np.zeros(3, dtype=np.int64)
    for k in range(3):
        if pbc[k]:
            n[k] = max(1, math.ceil(radius / heights[k]))
    return n


def _wrap(frac: np.ndarray, pbc: np.ndarray):
    """Wrap fractional coordinates into [0, 1) on periodic axes; returns (wrapped, integer offsets)."""
    off = np.where(pbc, np.floor(frac), 0.0)
    wrapped = frac - off
    over = pbc & (wrapped >= 1.0)  # -1e-17 - floor(-1e-17) rounds to 1.0
    wrapped = np.where(over, wrapped - 1.0, wrapped)
    off = off + over
    return wrapped, off.astype(np.int64)




def _empty_pairs():
    return (
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        np.zeros((0, 3), np.int32),
        np.zeros(0, np.float64),
    )


def _sorted_pairs(i, j, shifts, positions, cell, cutoff):
    """Exact float64 distances from the given (unwrapped) positions, strict cutoff, sorted."""
    vec = positions[j] - positions[i]
    if shifts.any():
        vec = vec + shifts @ cell
    dist = np.sqrt(np.einsum("ij,ij->i", vec, vec))
    keep = dist < cutoff
    i, j, shifts, dist = i[keep], j[keep], shifts[keep], dist[keep]
    if len(i):
        # one int64 sort key (i, j, S) instead of a 5-key lexsort
        lo = shifts.min(axis=0).astype(np.int64)
        span = shifts.max(axis=0).astype(np.int64) - lo + 1
        n = int(max(i.max(), j.max())) + 1
        key = i.astype(np.int64) * n + j
        for k in range(3):
            key = key * span[k] + (shifts[:, k] - lo[k])
        order = np.argsort(key, kind="stable")
    else:
        order = np.zeros(0, np.int64)
    return (
        i[order].astype(np.int64),
        j[order].astype(np.int64),
        shifts[order].astype(np.int32),
        dist[order],
    )


def _candidates_within(points_a: np.ndarray, points_b: np.ndarray, radius: float):
    """All (a, b) with |points_b[b] - points_a[a]| <= radius (a little slack; filtered later)."""
    n_a, n_b = len(points_a), len(points_b)
    if n_a == 0 or n_b == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if n_a * n_b <= _DENSE_STATIC_LIMIT:
        # |b - a|^2 = |a|^2 + |b|^2 - 2 a.b ; shift by the centroid to limit cancellation
        center = points_a.mean(axis=0)
        a = points_a - center
        b = points_b - center
        d2 = (
            np.einsum("ij,ij->i", a, a)[:, None]
            + np.einsum("ij,ij->i", b, b)[None, :]
            - 2.0 * (a @ b.T)
        )
        ia, ib = np.nonzero(d2 <= radius * radius)
        return ia, ib
    from scipy.spatial import cKDTree

    tree_a = cKDTree(points_a)
    tree_b = cKDTree(points_b)
    sdm = tree_a.sparse_distance_matrix(tree_b, radius, output_type="ndarray")
    return sdm["i"].astype(np.int64), sdm["j"].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# 1. static numpy neighbor list
# --------------------------------------------------------------------------------------------------


def neighbor_pairs(positions, cell, pbc, cutoff):
    """All pairs with distance < cutoff, ASE ``neighbor_list('ijSd')`` convention.

    Args:
      positions: [N, 3] Cartesian positions (Å), wrapped or not.
      cell: [3, 3] rows = lattice vectors; may be zero / None when ``pbc`` is all False.
      pbc: bool or [3] bool.
      cutoff: radius (Å), pairs with ``|D| < cutoff``.

    Returns:
      ``(i, j, shifts, distances)``: int64 [E], int64 [E], int32 [E, 3], float64 [E] with
      ``D = positions[j] - positions[i] + shifts @ cell``, sorted by (i, j, shift).

    Raises:
      NeighborListError: bad shapes, non-finite positions, or a singular cell with pbc.
    """
    positions = _check_positions(positions)
    pbc = _check_pbc(pbc)
    cell = _check_cell(cell, pbc)
    cutoff = _check_cutoff(cutoff)
    n_atoms = len(positions)
    if n_atoms == 0:
        return _empty_pairs()
    slack = 1e-6 * (1.0 + cutoff)  # candidate radius; exact strict filter afterwards

    if not pbc.any():
        ia, ib = _candidates_within(positions, positions, cutoff + slack)
        keep = ia != ib
        ia, ib = ia[keep], ib[keep]
        shifts = np.zeros((len(ia), 3), np.int32)
        return _sorted_pairs(ia, ib, shifts, positions, cell, cutoff)

    inv_cell = np.linalg.inv(cell)
    frac = positions @ inv_cell
    wrapped, off = _wrap(frac, pbc)
    wrapped_cart = wrapped @ cell
    heights = 1.0 / np.linalg.norm(inv_cell, axis=0)
    n_img = _image_counts(cell, pbc, cutoff, heights)

    # image copies of the wrapped atoms that can lie within cutoff of a point of the cell
    # (a slab test per periodic axis: fractional coordinate within (-c/h, 1 + c/h))
    reach = np.where(pbc, (cutoff + slack) / np.where(heights > 0, heights, 1.0), np.inf) + 1e-9
    ranges = [np.arange(-n_img[k], n_img[k] + 1) for k in range(3)]
    img_shifts = np.array(list(itertools.product(*ranges)), dtype=np.int64)  # [M, 3]
    # [M, N, 3] fractional image coordinates
    img_frac = wrapped[None, :, :] + img_shifts[:, None, :]
    inside = np.all((img_frac > -reach) & (img_frac < 1.0 + reach), axis=2)  # [M, N]
    m_idx, atom_idx = np.nonzero(inside)
    img_points = wrapped_cart[atom_idx] + img_shifts[m_idx] @ cell

    ia, ib = _candidates_within(wrapped_cart, img_points, cutoff + slack)
    i = ia
    j = atom_idx[ib]
    t = img_shifts[m_idx[ib]]
    # map shift of the wrapped image back to the unwrapped positions:
    # r_w = R - off @ cell  =>  D = R[j] - R[i] + (t - off[j] + off[i]) @ cell
    shifts = t - off[j] + off[i]
    keep = ~((i == j) & np.all(t == 0, axis=1))
    i, j, shifts = i[keep], j[keep], shifts[keep]
    return _sorted_pairs(i, j, shifts, positions, cell, cutoff)


# --------------------------------------------------------------------------------------------------
# 2. jittable neighbor list for MD
# --------------------------------------------------------------------------------------------------


def _register(cls, data_fields, meta_fields):
    import jax

    return jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta_fields)


@dataclasses.dataclass(frozen=True)
class Neighbors:
    """Fixed-capacity pair list (a pytree; ``method`` is static).

    Attributes:
      senders: [C] int32, ``j`` of each pair; padding slots hold N.
      receivers: [C] int32, ``i`` of each pair; padding slots hold N.
      shifts: [C, 3] int32 image shifts, ``D = R[senders] - R[receivers] + shifts @ cell``; 0 in padding.
      mask: [C] bool, True for real pairs (all within ``cutoff + skin`` at the last build).
      did_overflow: bool scalar, sticky: set when a build found more pairs than ``C`` (or jax-md's cell
        list overflowed). The list is then incomplete: re-allocate and redo the steps since the last
        good check.
      reference_positions: [N, 3] positions at the last build (unwrapped, as given).
      n_pairs: int32 scalar, pairs found at the last build ('multi_image': the true count, which can
        exceed C; 'jax_md': the number stored).
      n_builds: int32 scalar, number of builds since allocation (allocation counts as one).
      state: method-specific state (the ``jax_md`` NeighborList for 'jax_md', else None).
      method: 'jax_md' or 'multi_image' (static).
      cutoff, edge_capacity: (static) with ``edge_capacity > 0`` the model sees only the pairs within
        ``cutoff`` (not ``cutoff + skin``), compacted into ``edge_capacity`` slots at every force
        evaluation (:func:`edges_within_cutoff`); every ``update`` then also checks that they fit
        and sets ``did_overflow`` when they do not. 0: the model sees all stored pairs.
    """

    senders: Any
    receivers: Any
    shifts: Any
    mask: Any
    did_overflow: Any
    reference_positions: Any
    n_pairs: Any
    n_builds: Any
    state: Any = None
    method: str = "multi_image"
    cutoff: float = 0.0
    edge_capacity: int = 0

    @property
    def capacity(self) -> int:
        return int(self.senders.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.reference_positions.shape[0])


_register(
    Neighbors,
    data_fields=[
        "senders",
        "receivers",
        "shifts",
        "mask",
        "did_overflow",
        "reference_positions",
        "n_pairs",
        "n_builds",
        "state",
    ],
    meta_fields=["method", "cutoff", "edge_capacity"],
)


@dataclasses.dataclass(frozen=True, eq=False)
class NeighborListFns:
    """``allocate(positions, extra_capacity=0) -> Neighbors`` (host) and
    ``update(positions, neighbors) -> Neighbors`` (jittable), plus the settings they were built with.

    ``extra_capacity`` is per atom (as in jax-md's sparse formats): capacity grows by
    ``N * extra_capacity`` slots.
    """

    allocate: Callable[..., Neighbors]
    update: Callable[[Any, Neighbors], Neighbors]
    method: str
    cutoff: float
    skin: float
    cell: np.ndarray
    pbc: np.ndarray
    capacity_multiplier: float
    n_images: tuple  # images on each side per axis ('multi_image'), zeros for 'jax_md'
    # check(positions, neighbors) -> neighbors: update's overflow check without the rebuild (for
    # callers that skip update when no atom moved far); None when there is nothing to check
    check: Callable | None = None


def choose_method(cell, pbc, cutoff: float, skin: float = 0.5) -> str:
    """'jax_md' when minimum image holds for ``cutoff + skin`` (or nothing is periodic), else 'multi_image'."""
    pbc = _check_pbc(pbc)
    if not pbc.any():
        return "jax_md"
    if not pbc.all():
        return "multi_image"
    cell = _check_cell(cell, pbc)
    return "jax_md" if (cutoff + skin) < 0.5 * cell_heights(cell).min() else "multi_image"


def check_overflow(neighbors: Neighbors, where: str = "") -> None:
    """Host-side check: raise NeighborListError if the list overflowed its capacity."""
    if bool(np.asarray(neighbors.did_overflow)):
        at = f" at {where}" if where else ""
        raise NeighborListError(
            f"neighbor list ({neighbors.method}) overflowed{at}: capacity {neighbors.capacity} pairs, "
            f"last build found {int(np.asarray(neighbors.n_pairs))} (a lower bound for 'jax_md'). "
            "Re-allocate from the positions at the start of the chunk (allocate(...), possibly with a "
            "larger capacity_multiplier or extra_capacity) and redo the chunk."
        )


def neighbors_to_numpy(neighbors: Neighbors, positions=None, cell=None, cutoff: float | None = None):
    """Host helper: the stored pairs as numpy ``(i, j, shifts)`` (i = receivers, j = senders).

    With ``positions``, ``cell`` and ``cutoff`` given, only pairs with ``|D| < cutoff`` are kept and
    ``(i, j, shifts, distances)`` is returned, sorted like :func:`neighbor_pairs`.
    """
    mask = np.asarray(neighbors.mask)
    i = np.asarray(neighbors.receivers)[mask].astype(np.int64)
    j = np.asarray(neighbors.senders)[mask].astype(np.int64)
    s = np.asarray(neighbors.shifts)[mask].astype(np.int32)
    if positions is None:
        return i, j, s
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
    return _sorted_pairs(i, j, s, positions, cell, float(cutoff))


def _upper_triangular_box(cell: np.ndarray) -> np.ndarray:
    """jax-md box (lattice vectors as columns), rotated to upper-triangular with positive diagonal.

    jax-md's cell-list sizing reads only the upper triangle of the box. Pair detection depends only
    on fractional coordinates and lengths, so a rotated (or reflected) box gives the same pairs.
    """
    q, r = np.linalg.qr(cell.T)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    r = signs[:, None] * r
    return np.triu(r)


@dataclasses.dataclass
class _Settings:
    cell: np.ndarray
    pbc: np.ndarray
    cutoff: float
    skin: float
    capacity_multiplier: float
    max_dense_candidates: float


def md_neighbor_list(
    cell,
    pbc,
    cutoff: float,
    skin: float = 0.5,
    capacity_multiplier: float = 1.25,
    method: str | None = None,
    max_dense_candidates: float = MAX_DENSE_CANDIDATES,
    n_atoms: int | None = None,
    compact_edges: bool = False,
) -> NeighborListFns:
    """Jittable neighbor list for MD on a fixed cell (pairs within ``cutoff + skin``).

    Args:
      cell: [3, 3] rows = lattice vectors (ignored / may be zero when nothing is periodic).
      pbc: bool or [3] bool.
      cutoff: interaction cutoff (Å).
      skin: extra radius; the list is rebuilt when an atom moved more than ``skin / 2``.
        ``skin = 0`` rebuilds at every update.
      capacity_multiplier: capacity = pairs at allocation * multiplier (+ N * extra_capacity).
      method: None (automatic), 'jax_md' or 'multi_image'.
      max_dense_candidates: 'multi_image' refuses systems with more dense candidates than this:
        N^2 * prod_k K_k, K_k = ceil(2 (cutoff + skin) / h_k) candidate shifts per pair and axis
        (at most 2 n_k + 1).
      n_atoms: optional; if given, the size check of 'multi_image' happens here, not at allocate.
      compact_edges: hand the model only the pairs within ``cutoff``, compacted into a second buffer
        of ``pairs within cutoff at allocation * capacity_multiplier (+ N * extra_capacity)`` slots
        (``Neighbors.edge_capacity``; :func:`edges_within_cutoff`). The skin then costs a distance
        check per stored pair instead of a model evaluation per skin pair (the shell between
        ``cutoff`` and ``cutoff + skin`` holds ~30% of the pairs at 5 + 0.5 Å). ``update`` checks
        that the pairs within the cutoff fit and sets ``did_overflow`` when they do not.

    Returns:
      NeighborListFns(allocate, update, ...).

    Raises:
      NeighborListError: invalid cell / cutoff, 'jax_md' forced where minimum image fails, or a
        cell too small for the dense 'multi_image' candidate set.
    """
    pbc = _check_pbc(pbc)
    cell = _check_cell(cell, pbc)
    cutoff = _check_cutoff(cutoff)
    skin = float(skin)
    if not (np.isfinite(skin) and skin >= 0):
        raise NeighborListError(f"skin must be >= 0, got {skin}")
    if not capacity_multiplier >= 1.0:
        raise NeighborListError(f"capacity_multiplier must be >= 1, got {capacity_multiplier}")
    radius = cutoff + skin
    heights = cell_heights(cell) if pbc.any() else np.zeros(3)
    auto = choose_method(cell, pbc, cutoff, skin)
    if method is None:
        method = auto
    if method not in ("jax_md", "multi_image"):
        raise NeighborListError(f"unknown neighbor list method '{method}' (use 'jax_md' or 'multi_image')")
    if method == "jax_md" and auto != "jax_md":
        if not pbc.all():
            raise NeighborListError(
                f"method 'jax_md' needs all or no axes periodic, got pbc={pbc.tolist()}; use 'multi_image'"
            )
        raise NeighborListError(
            f"method 'jax_md' needs the minimum image convention: cutoff + skin = {radius:.3f} Å must be "
            f"below half the smallest cell height ({heights.min():.3f} / 2 Å; heights "
            f"{np.round(heights, 3).tolist()} Å). Use method 'multi_image', replicate the cell, or "
            "reduce cutoff / skin."
        )
    settings = _Settings(cell, pbc, cutoff, skin, float(capacity_multiplier), float(max_dense_candidates))
    if method == "jax_md":
        fns = _jax_md_fns(settings)
    else:
        fns = _multi_image_fns(settings)
        if n_atoms is not None:
            fns.allocate.check_size(int(n_atoms))
    return _with_edge_compaction(fns) if compact_edges else fns


def pair_vectors(positions, neighbors: Neighbors, cell):
    """[C, 3] ``D = R[senders] - R[receivers] + shifts @ cell`` of the stored pairs (0 in padding slots)."""
    import jax.numpy as jnp

    n = positions.shape[0]
    s = jnp.minimum(neighbors.senders, n - 1)
    r = jnp.minimum(neighbors.receivers, n - 1)
    d = positions[s] - positions[r] + neighbors.shifts.astype(positions.dtype) @ jnp.asarray(cell, positions.dtype)
    return jnp.where(neighbors.mask[:, None], d, 0.0)


def _inside(positions, neighbors: Neighbors, cell):
    import jax.numpy as jnp
    from jax import lax

    d = pair_vectors(lax.stop_gradient(positions), neighbors, cell)
    return neighbors.mask & (jnp.sum(d * d, axis=-1) < neighbors.cutoff * neighbors.cutoff)


def edges_within_cutoff(positions, neighbors: Neighbors, cell):
    """The stored pairs within ``neighbors.cutoff`` at ``positions``, compacted into
    ``neighbors.edge_capacity`` slots: ``(senders, receivers, shifts, mask)`` (padding slots hold N).

    Which pairs are inside is piecewise constant in the positions (no gradient through the choice);
    pairs beyond the cutoff contribute nothing to any model with a cutoff envelope, so the energy and
    its derivatives are those of the full list. Pairs beyond ``edge_capacity`` are dropped: the
    caller must check overflow (``update`` does, at every step).
    """
    import jax.numpy as jnp

    n = positions.shape[0]
    cap = int(neighbors.edge_capacity)
    idx, count = _compact(_inside(positions, neighbors, cell), cap)
    valid = jnp.arange(cap) < jnp.minimum(count, cap)
    senders = jnp.where(valid, neighbors.senders[idx], n).astype(jnp.int32)
    receivers = jnp.where(valid, neighbors.receivers[idx], n).astype(jnp.int32)
    shifts = jnp.where(valid[:, None], neighbors.shifts[idx], 0)
    return senders, receivers, shifts, valid


def _with_edge_compaction(fns: NeighborListFns) -> NeighborListFns:
    import jax.numpy as jnp

    cell = fns.cell

    def count_inside(positions, neighbors):
        return jnp.sum(_inside(positions, neighbors, cell), dtype=jnp.int32)

    def allocate(positions, extra_capacity: int = 0) -> Neighbors:
        nb = fns.allocate(positions, extra_capacity)
        nb = dataclasses.replace(nb, cutoff=fns.cutoff)
        n = nb.n_atoms
        count = int(count_inside(nb.reference_positions, nb))
        # the second term lets a reallocation (larger multiplier) grow the buffer even from no pairs
        cap = int(count * fns.capacity_multiplier) + n * int(extra_capacity) + math.ceil(n * (fns.capacity_multiplier - 1.0))
        return dataclasses.replace(nb, edge_capacity=max(1, min(cap, nb.capacity)))

    def check(positions, neighbors: Neighbors) -> Neighbors:
        over = count_inside(positions.astype(neighbors.reference_positions.dtype), neighbors) > neighbors.edge_capacity
        return dataclasses.replace(neighbors, did_overflow=neighbors.did_overflow | over)

    def update(positions, neighbors: Neighbors) -> Neighbors:
        return check(positions, fns.update(positions, neighbors))

    return dataclasses.replace(fns, allocate=_Allocate(allocate, fns.allocate.check_size), update=update, check=check)


def needs_rebuild(positions, reference, skin):
    """True when some atom moved more than half the skin since the list was built (always without a skin)."""
    import jax.numpy as jnp

    if skin <= 0:
        return jnp.asarray(True)
    d = positions - reference
    return jnp.any(jnp.sum(d * d, axis=-1) > (0.5 * skin) ** 2)


def _make_update(build, skin, method):
    from jax import lax

    def update(positions, neighbors: Neighbors) -> Neighbors:
        if neighbors.method != method:
            raise NeighborListError(
                f"neighbor list was allocated with method '{neighbors.method}', this update is '{method}'"
            )
        positions = lax.stop_gradient(positions).astype(neighbors.reference_positions.dtype)
        rebuild = needs_rebuild(positions, neighbors.reference_positions, skin)

        def rebuilt(r, n):  # a build knows nothing of the static edge-compaction settings: keep them
            return dataclasses.replace(build(r, n), cutoff=n.cutoff, edge_capacity=n.edge_capacity)

        return lax.cond(rebuild, rebuilt, lambda r, n: n, positions, neighbors)

    return update


def _wrap_jnp(frac, pbc):
    import jax.numpy as jnp

    off = jnp.where(pbc, jnp.floor(frac), 0.0)
    wrapped = frac - off
    over = pbc & (wrapped >= 1.0)
    wrapped = jnp.where(over, wrapped - 1.0, wrapped)
    off = off + over
    return wrapped, off


@dataclasses.dataclass(frozen=True)
class _Allocate:
    """Callable allocate with a size check hook (the dense method needs N before compiling)."""

    fn: Callable
    check_size: Callable

    def __call__(self, positions, extra_capacity: int = 0) -> Neighbors:
        return self.fn(positions, extra_capacity)


# ---------------------------------------------------------------- 'jax_md' method


def _static_cell_size(jn):
    """jax-md keeps ``cell_size`` (a jax array) in a *static* pytree field. Two such arrays that are
    not the same object get compared with ``==`` when JAX checks tree structures (lax.cond branches,
    jit caches); inside a trace that comparison is staged and fails (TracerBoolConversionError).
    Replace it by plain Python floats; jax-md only passes it through on update."""
    cs = jn.cell_size
    if cs is None or isinstance(cs, (float, int, tuple)):
        return jn
    arr = np.asarray(cs, dtype=np.float64)
    value = float(arr) if arr.ndim == 0 else tuple(float(x) for x in arr.reshape(-1))
    return dataclasses.replace(jn, cell_size=value)


@contextlib.contextmanager
def _quiet_jax_md():
    """jax-md 0.2.29's sparse prune scatters int64 indices into int32 under x64 and JAX warns (at
    trace time) that this will become an error; the values are < N, so the cast is harmless."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="scatter inputs have incompatible types", category=FutureWarning
        )
        yield


def _jax_md_fns(st: _Settings) -> NeighborListFns:
    import jax
    import jax.numpy as jnp
    from jax_md import partition, space

    radius = st.cutoff + st.skin
    periodic = bool(st.pbc.all())
    if periodic:
        box = _upper_triangular_box(st.cell)
        displacement, _ = space.periodic_general(jnp.asarray(box), fractional_coordinates=True)
        inv_cell_np = np.linalg.inv(st.cell)
        jmd = partition.neighbor_list(
            displacement,
            box,
            r_cutoff=radius,
            dr_threshold=0.0,  # we decide when to rebuild; jax-md rebuilds on every call
            capacity_multiplier=st.capacity_multiplier,
            format=partition.Sparse,
            fractional_coordinates=True,
        )
    else:
        displacement, _ = space.free()
        inv_cell_np = None
        jmd = partition.neighbor_list(
            displacement,
            1.0,
            r_cutoff=radius,
            dr_threshold=0.0,
            capacity_multiplier=st.capacity_multiplier,
            format=partition.Sparse,
            disable_cell_list=True,  # no box to grid; N^2 candidates (molecules)
        )

    def jmd_input(positions):
        if not periodic:
            return positions, None
        inv_cell = jnp.asarray(inv_cell_np, dtype=positions.dtype)
        frac = positions @ inv_cell
        wrapped, _ = _wrap_jnp(frac, jnp.ones(3, bool))
        return wrapped, frac

    def finish(positions, frac, jn, old_overflow, n_builds) -> Neighbors:
        n = positions.shape[0]
        receivers = jn.idx[0].astype(jnp.int32)
        senders = jn.idx[1].astype(jnp.int32)
        mask = receivers < n
        js, is_ = jnp.minimum(senders, n - 1), jnp.minimum(receivers, n - 1)
        if periodic:
            # minimum image holds for every stored pair: S = -round(s_j - s_i) (unwrapped s)
            shifts = -jnp.round(frac[js] - frac[is_]).astype(jnp.int32)
            vec = positions[js] - positions[is_] + shifts.astype(positions.dtype) @ jnp.asarray(
                st.cell, dtype=positions.dtype
            )
        else:
            shifts = jnp.zeros((senders.shape[0], 3), jnp.int32)
            vec = positions[js] - positions[is_]
        # jax-md parks rejected candidates in the last slot of its full-length buffer; if the
        # capacity reaches that slot it would look like a pair. Keep only pairs within the radius.
        mask = mask & (jnp.sum(vec * vec, axis=-1) < radius * radius)
        senders = jnp.where(mask, senders, n)
        receivers = jnp.where(mask, receivers, n)
        shifts = jnp.where(mask[:, None], shifts, 0)
        overflow = jnp.asarray(jn.did_buffer_overflow != 0) | old_overflow
        return Neighbors(
            senders=senders,
            receivers=receivers,
            shifts=shifts,
            mask=mask,
            did_overflow=overflow,
            reference_positions=positions,
            n_pairs=jnp.sum(mask, dtype=jnp.int32),
            n_builds=n_builds,
            state=jn,
            method="jax_md",
        )

    def build(positions, neighbors: Neighbors) -> Neighbors:
        wrapped, frac = jmd_input(positions)
        with _quiet_jax_md():
            jn = jmd.update(wrapped, neighbors.state)
        return finish(positions, frac, jn, neighbors.did_overflow, neighbors.n_builds + 1)

    # allocate runs on the host: jit its pieces (one compile instead of dozens of eager op compiles)
    jmd_input_jit = jax.jit(jmd_input)
    finish_jit = jax.jit(finish)

    def allocate(positions, extra_capacity: int = 0) -> Neighbors:
        positions = _positions_for_md(positions)
        wrapped, frac = jmd_input_jit(positions)
        with _quiet_jax_md():
            jn = jmd.allocate(wrapped, extra_capacity=int(extra_capacity))
        jn = _static_cell_size(jn)
        return finish_jit(positions, frac, jn, jnp.asarray(False), jnp.asarray(1, jnp.int32))

    update = _make_update(build, st.skin, "jax_md")
    return NeighborListFns(
        allocate=_Allocate(allocate, lambda n: None),
        update=update,
        method="jax_md",
        cutoff=st.cutoff,
        skin=st.skin,
        cell=st.cell,
        pbc=st.pbc,
        capacity_multiplier=st.capacity_multiplier,
        n_images=(0, 0, 0),
    )


def _positions_for_md(positions):
    import jax.numpy as jnp

    arr = np.asarray(positions)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise NeighborListError(f"positions must have shape [N, 3], got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise NeighborListError("non-finite positions")
    if arr.shape[0] == 0:
        raise NeighborListError("no atoms")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(np.float64)
    return jnp.asarray(arr)  # float64 stays float64 only with jax_enable_x64


# ---------------------------------------------------------------- 'multi_image' method


def _compact(flags, capacity: int):
    """Indices of the True entries of a flat bool array, in order, in a buffer of ``capacity``
    (like ``jnp.nonzero(flags, size=capacity)``), and their count.

    A blocked prefix sum: XLA:CPU's cumsum over ~10^5 elements is slow (~1 ms); cumsum within
    rows of 128 plus a cumsum over the row totals is several times faster.
    """
    import jax.numpy as jnp

    n = flags.shape[0]
    block = 128
    padded = -(-n // block) * block
    x = jnp.pad(flags.astype(jnp.int32), (0, padded - n)).reshape(-1, block)
    within = jnp.cumsum(x, axis=1)
    totals = within[:, -1]
    rank = (within + (jnp.cumsum(totals) - totals)[:, None]).reshape(-1)[:n] - 1
    count = jnp.sum(totals)
    target = jnp.where(flags, rank, capacity)  # out of range -> dropped
    idx = jnp.zeros((capacity,), jnp.int32).at[target].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop"
    )
    return idx, count.astype(jnp.int32)


def _multi_image_candidates(st: _Settings):
    """Per pair (i, j), the block of candidate image shifts the multi-image list tries.

    For a pair with wrapped fractional difference f = s_j - s_i, an image T can be within the radius
    only if |f_k + T_k| < r / h_k on every periodic axis: at most ceil(2 r / h_k) consecutive
    integers starting at floor(-f_k - r / h_k) + 1. So each pair gets a block of prod(K_k) candidate
    shifts (LiPS at 5.5 Å: 1, P2S5: 8) instead of prod(2 n_k + 1) (27). Returns (radius, periodic,
    n_img, heights, reach, eps, offsets [K, 3], inverse cell or None)."""
    radius = st.cutoff + st.skin
    periodic = bool(st.pbc.any())
    n_img = _image_counts(st.cell, st.pbc, radius)
    heights = cell_heights(st.cell) if periodic else np.ones(3)
    eps = 1e-6
    reach = np.where(st.pbc, radius / heights, 0.0)
    per_axis = np.where(st.pbc, np.ceil(2.0 * (reach + eps)).astype(np.int64), 1)
    per_axis = np.minimum(per_axis, 2 * n_img + 1)
    offsets_np = np.array(list(itertools.product(*[np.arange(k) for k in per_axis])), dtype=np.int32)
    inv_cell_np = np.linalg.inv(st.cell) if periodic else None
    return radius, periodic, n_img, heights, reach, eps, offsets_np, inv_cell_np


def _multi_image_size_check(st: _Settings, n_img, n_cand: int, heights, radius: float, periodic: bool):
    """``check_size(n)``: refuse a dense candidate search too big to hold."""

    def check_size(n: int):
        count = float(n) * n * n_cand
        if count > st.max_dense_candidates:
            dense = tuple(int(x) for x in 2 * n_img + 1)
            raise NeighborListError(
                f"neighbor list: the cell is too small for the minimum image convention and too big for "
                f"the dense multi-image list: {n} atoms x {n} atoms x {n_cand} candidate image shifts "
                f"per pair (of {dense} images) = {count:.3g} candidates > limit "
                f"{st.max_dense_candidates:.3g}. Cell heights {np.round(heights, 3).tolist()} Å, "
                f"cutoff + skin = {radius:.3f} Å (minimum image needs cutoff + skin < "
                f"{0.5 * heights.min() if periodic else float('inf'):.3f} Å). Replicate the cell "
                "(a supercell) or use a smaller cutoff / skin."
            )

    return check_size


def _multi_image_search(st: _Settings, radius: float, periodic: bool, reach, eps: float, offsets_np, inv_cell_np):
    """``search(positions)`` over every (i, j, candidate shift)."""
    import jax.numpy as jnp

    n_cand = len(offsets_np)

    def search(positions):
        """Candidates within the radius: flat bool [N * N * K], per-pair base shifts, atom offsets."""
        dtype = positions.dtype
        n = positions.shape[0]
        offsets = jnp.asarray(offsets_np)  # [K, 3]
        if periodic:
            cell = jnp.asarray(st.cell, dtype=dtype)
            inv_cell = jnp.asarray(inv_cell_np, dtype=dtype)
            pbc = jnp.asarray(st.pbc)
            wrapped, off = _wrap_jnp(positions @ inv_cell, pbc)
            f = wrapped[None, :, :] - wrapped[:, None, :]  # f[i, j] = s_j - s_i, in (-1, 1)
            base = jnp.where(pbc, jnp.floor(-f - jnp.asarray(reach + eps, dtype)) + 1.0, 0.0)
            g = (f + base) @ cell  # [N, N, 3] Cartesian vector for offset 0
            o = offsets.astype(dtype) @ cell  # [K, 3]
            d2 = (
                jnp.sum(g * g, axis=-1)[:, :, None]
                + 2.0 * jnp.einsum("ijc,kc->ijk", g, o)
                + jnp.sum(o * o, axis=-1)[None, None, :]
            )
            base = base.astype(jnp.int32)
            off = off.astype(jnp.int32)
            # (i, i, T = 0) is not a pair
            zero = jnp.all(jnp.diagonal(base, axis1=0, axis2=1).T[:, None, :] + offsets[None] == 0, axis=-1)
            self_pair = jnp.zeros((n, n, n_cand), bool).at[jnp.arange(n), jnp.arange(n)].set(zero)
        else:
            g = positions[None, :, :] - positions[:, None, :]
            d2 = jnp.sum(g * g, axis=-1)[:, :, None]
            base = jnp.zeros((n, n, 3), jnp.int32)
            off = jnp.zeros((n, 3), jnp.int32)
            self_pair = jnp.eye(n, dtype=bool)[:, :, None]
        flags = (d2 < radius * radius) & ~self_pair
        return flags.reshape(-1), base, off

    return search


def _multi_image_fns(st: _Settings) -> NeighborListFns:
    import jax
    import jax.numpy as jnp

    radius, periodic, n_img, heights, reach, eps, offsets_np, inv_cell_np = _multi_image_candidates(st)
    n_cand = len(offsets_np)  # candidate shifts per (i, j)
    check_size = _multi_image_size_check(st, n_img, n_cand, heights, radius, periodic)
    search = _multi_image_search(st, radius, periodic, reach, eps, offsets_np, inv_cell_np)

    def build_arrays(positions, capacity: int):
        n = positions.shape[0]
        flags, base, off = search(positions)
        idx, count = _compact(flags, capacity)
        valid = jnp.arange(capacity) < jnp.minimum(count, capacity)
        i = idx // (n * n_cand)
        j = (idx // n_cand) % n
        k = idx % n_cand
        # shift in the wrapped frame, then back to the unwrapped positions:
        # r_w = R - off @ cell  =>  D = R[j] - R[i] + (T - off[j] + off[i]) @ cell
        shifts = base[i, j] + jnp.asarray(offsets_np)[k] - off[j] + off[i]
        receivers = jnp.where(valid, i, n).astype(jnp.int32)
        senders = jnp.where(valid, j, n).astype(jnp.int32)
        shifts = jnp.where(valid[:, None], shifts, 0).astype(jnp.int32)
        return senders, receivers, shifts, valid, count

    def build(positions, neighbors: Neighbors) -> Neighbors:
        senders, receivers, shifts, mask, count = build_arrays(positions, neighbors.capacity)
        return Neighbors(
            senders=senders,
            receivers=receivers,
            shifts=shifts,
            mask=mask,
            did_overflow=neighbors.did_overflow | (count > neighbors.capacity),
            reference_positions=positions,
            n_pairs=count,
            n_builds=neighbors.n_builds + 1,
            state=None,
            method="multi_image",
        )

    build_jit = jax.jit(build_arrays, static_argnums=1)

    def allocate(positions, extra_capacity: int = 0) -> Neighbors:
        positions = _positions_for_md(positions)
        n = positions.shape[0]
        check_size(n)
        # size from the host list (same pairs, up to rounding at the radius; saves a compile)
        count = len(neighbor_pairs(np.asarray(positions, np.float64), st.cell, st.pbc, radius)[0])
        capacity = int(count * st.capacity_multiplier) + n * int(extra_capacity)
        capacity = max(1, min(capacity, n * n * n_cand))
        senders, receivers, shifts, mask, count = build_jit(positions, capacity)
        return Neighbors(
            senders=senders,
            receivers=receivers,
            shifts=shifts,
            mask=mask,
            did_overflow=jnp.asarray(count > capacity),
            reference_positions=positions,
            n_pairs=count,
            n_builds=jnp.asarray(1, jnp.int32),
            state=None,
            method="multi_image",
        )

    update = _make_update(build, st.skin, "multi_image")
    return NeighborListFns(
        allocate=_Allocate(allocate, check_size),
        update=update,
        method="multi_image",
        cutoff=st.cutoff,
        skin=st.skin,
        cell=st.cell,
        pbc=st.pbc,
        capacity_multiplier=st.capacity_multiplier,
        n_images=tuple(int(x) for x in n_img),
    )
