"""Simulation metrics: structure, dynamics, transport, stability, errors and speed.

Small pure functions in the jax-md / e3nn-jax style: arrays in, arrays out. Everything that depends
on the trajectory (positions, energies, forces) is traced JAX and can be ``jax.vmap``-ed over
replicas; everything that fixes array *shapes* (species, bins, periodic image shifts, bonds) is
static host data (numpy), computed from concrete arguments.

Conventions (those of :mod:`jaxbench.neighbors`): cell vectors are the ROWS of ``cell``; positions
in Å, time in fs, energies in eV, forces in eV/Å. Trajectories are ``[T, N, 3]``; a cell is either
``[3, 3]`` (fixed) or ``[T, 3, 3]`` (per frame). Use float64 (``jax_enable_x64``) for 1e-6 checks.

Definitions chosen, and where they differ from the papers
----------------------------------------------------------

RDF ``g(r)`` (:func:`rdf`, :func:`rdf_frames`)
    Histogram of all pair distances ``|x_j - x_i + S @ cell| < r_max`` over *all* periodic images
    ``S`` in ``[-n_k, n_k]`` with ``n_k = ceil(r_max / h_k)`` (``h_k`` the perpendicular cell
    heights, :func:`jaxbench.neighbors.cell_heights`), so ``r_max`` may exceed half the cell, for
    any triclinic cell. Positions are wrapped into the cell first (unwrapped input is fine). Bins
    are ``[k dr, (k+1) dr)``, ``k = 0 .. round(r_max / dr) - 1``; ``r`` returned are bin centres.
    Standard normalisation (ASE >= 3.27 / LAMMPS ``compute rdf``): for ordered pairs (a, b)
    ``g_ab(r) = n_ab(r) / (N_a * (N_b / V) * V_shell(r))`` with the exact shell volume
    ``4/3 pi (r_hi^3 - r_lo^3)``; total ``g = n(r) / (N * (N / V) * V_shell)``. Hence
    ``g = sum_ab c_a c_b g_ab`` (ordered pairs, ``c`` atomic fractions) and an ideal gas of ``N``
    atoms gives ``g -> (N - 1) / N``, not 1. Per frame, then averaged over (masked) frames.
    Partials are true A-B partials (not ASE < 3.27's "total RDF of the A+B subset").
    When ``r_max <= h_min / 2`` a minimum-image path (one image per pair) gives the same result
    ~27x cheaper. Frames are processed by ``lax.map`` in chunks of about ``_PAIR_BUDGET``
    distances, so memory stays bounded (1000 frames x 200 atoms is fine).
h(r) (:func:`distance_histogram`) — "Forces are not Enough" (FaNE) eq. 1
    ``h(r) = 1 / (N (N-1)) sum_i sum_{j != i} delta(r - r_ij)`` as a histogram *density* (per Å):
    ``counts / (N (N-1) dr)``, so it integrates to 1 when all distances are below ``r_max``.
Wright's factor (:func:`wright_factor`) — EGraFFBench eq. 2
    ``R_chi = 100 * sqrt(sum (g - g_ref)^2 / sum g_ref^2)`` in percent. The paper prints it without
    the square root (and its code computes it that way); the "acceptable below 9 %" rule (Bauchy
    2014) assumes the root. ``root=False`` returns the paper's unrooted ratio (times 100).
JSD (:func:`jensen_shannon`) — EGraFFBench eq. 3
    Each RDF is normalised to a discrete probability distribution over its bins,
    ``p_k = g_k / sum_k g_k`` (the weighting by ``r^2`` is *not* applied: the paper treats g itself as
    the distribution), natural log (nats; at most ln 2), ``0 log 0 = 0``. EGraFFBench's values up to
    66 cannot come from normalised distributions; we do not try to reproduce them.
EV / FV (:func:`energy_violation`, :func:`force_violation`) — EGraFFBench eq. 4
    ``EV = (E_hat - E)^2 / (E_hat^2 + E^2)``; ``FV = ||F_hat - F||_2 / (||F_hat||_2 + ||F||_2)`` with
    the 2-norm over the whole ``3N`` force vector of the frame. Geometric mean over time
    (:func:`geometric_mean`; 0 if any value is exactly 0, unless a floor ``eps`` is given), then mean
    and standard deviation (``ddof=0`` by default) over replicas (:func:`violation_summary`).
RDF MAE (:func:`rdf_mae`) — FaNE eq. 3
    ``sum_k |g_k - g_ref,k| * dr`` (integral over r, rectangle rule on the bins). The same formula is
    used for the h(r) MAE (h is a density, so the h(r) MAE lies in [0, 2]).
Stability
    :func:`stability_rdf` (FaNE eq. 8): the first frame ``T`` at which the RDF averaged over
    ``[T, T + window)`` deviates from the reference by ``rdf_mae > threshold`` (paper: tau = 1 ps,
    Delta = 1.0 for LiPS, 3.0 for water, unstable if *any* element-pair RDF exceeds); windows slide
    by ``stride`` frames (default 1). :func:`stability_bond` (FaNE eq. 9): bonds are the pairs
    with ``d_ij < 1.2 (r_cov,i + r_cov,j)`` (ASE covalent radii) on the first frame, *without* an
    additive neighbour-list skin (``mult=1.0`` misses most real bonds, see
    :func:`covalent_bonds`); the equilibrium length ``b_ij`` defaults to the first-frame length (pass
    reference mean lengths to follow the paper more closely); unstable when
    ``max |d_ij(T) - b_ij| > 0.5 Å``. Both return the first unstable frame, or ``T`` if none;
    observables are then computed on frames ``< t_unstable`` (``frame_mask`` of :func:`rdf`, or
    :func:`stable_mask`).
MSD and diffusivity (:func:`msd`, :func:`diffusivity`) — FaNE eq. 4 and App. A
    MSD from unwrapped positions (:func:`unwrap`). The diffusivity is *not* the pointwise
    ``MSD / 6t`` of eq. 4 (biased at short t): for every window ``[t0, t0 + K)`` after the
    equilibration cut the least-squares slope (with intercept) of ``MSD_t0(tau)`` vs ``tau`` is
    taken, ``D = slope / 6``, averaged over all windows ``t0 = eq .. T - K`` (FaNE: K = 35 ps and a
    5 ps cut for LiPS). Because the slope is linear in the MSD values, the average of the window
    slopes equals the slope of the origin-averaged MSD; that is how it is computed (exactly).
    Returned in cm^2/s for ``dt`` in fs and positions in Å. Window and cut are parameters (frames);
    restrict to the stable part by slicing ``positions[:t_unstable]`` first.
Ionic conductivity (:func:`nernst_einstein_conductivity`, :func:`arrhenius_fit`)
    ``sigma = n (z e)^2 D / (k_B T)`` in S/cm (Haven ratio 1, self-diffusivity of the carrier).
    Arrhenius on ``ln(sigma T) = ln A - E_a / (k_B T)`` (the Nernst–Einstein form; fitting
    ``ln sigma`` changes the 300 K extrapolation by about 2x; ``quantity='sigma'`` gives that).
    GraNNField Table 2 reports ``-log10(sigma)`` without a unit (its text says 298 K, the table
    300 K); only mS/cm makes its numbers plausible: :func:`neg_log10_conductivity` defaults to it.
RMSD, errors, speed
    :func:`rmsd` per frame against a reference (first frame by default), optionally after Kabsch
    alignment (use ``align=False`` for periodic systems); :func:`energy_mae` in meV (total energy,
    or per atom), :func:`force_mae` in meV/Å (mean over all components); :func:`speed`.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .compiled import register as register_compiled
from .neighbors import cell_heights

__all__ = [
    "image_shifts",
    "rdf_frames",
    "rdf",
    "species_pairs",
    "distance_histogram_frames",
    "distance_histogram",
    "wright_factor",
    "jensen_shannon",
    "rdf_mae",
    "energy_violation",
    "force_violation",
    "geometric_mean",
    "violation_summary",
    "ViolationSummary",
    "stable_mask",
    "stability_rdf",
    "covalent_bonds",
    "bond_deviation",
    "stability_bond",
    "unwrap",
    "msd",
    "msd_lags",
    "diffusivity",
    "nernst_einstein_conductivity",
    "neg_log10_conductivity",
    "arrhenius_fit",
    "ArrheniusFit",
    "rmsd",
    "energy_mae",
    "force_mae",
    "speed",
    "Speed",
    "stack_frames",
    "K_B_EV",
    "K_B_J",
    "E_CHARGE",
    "A2_PER_FS_TO_CM2_PER_S",
]

K_B_EV = 8.617333262e-5  # eV/K
K_B_J = 1.380649e-23  # J/K
E_CHARGE = 1.602176634e-19  # C
A2_PER_FS_TO_CM2_PER_S = 0.1  # 1 Å^2/fs = 1e-16 cm^2 / 1e-15 s
_A3_TO_CM3 = 1e-24

# Memory budget for one chunk of frames in the pair histograms: number of (i, j, image) distances.
_PAIR_BUDGET = 2_000_000  # ~50 MB per float64 [.., 3] array


# --------------------------------------------------------------------------------------------------
# host-side helpers
# --------------------------------------------------------------------------------------------------


def _pbc3(pbc) -> np.ndarray:
    pbc = np.asarray(pbc, dtype=bool)
    return np.repeat(pbc, 3) if pbc.ndim == 0 else pbc.reshape(3)


def _nbins(r_max: float, dr: float) -> int:
    n = int(round(float(r_max) / float(dr)))
    if n < 1 or abs(n * dr - r_max) > 1e-9 * max(1.0, r_max):
        raise ValueError(f"r_max / dr must be a positive integer, got r_max={r_max}, dr={dr}")
    return n


def image_shifts(cell, pbc, r_max: float) -> np.ndarray:
    """Integer image shifts ``[S, 3]`` covering every pair within ``r_max`` of wrapped positions.

    ``n_k = ceil(r_max / h_k)`` images on each side along periodic axes (``h_k`` perpendicular
    heights; for a ``[T, 3, 3]`` cell the smallest height over frames), 0 on the others. With both
    atoms' fractional coordinates in ``[0, 1)``, ``|D . b_k| = |f_k| < r_max / h_k`` forces
    ``|S_k| <= n_k``. The zero shift is first.
    """
    pbc = _pbc3(pbc)
    if not pbc.any():
        return np.zeros((1, 3), dtype=np.int64)
    cells = np.asarray(cell, dtype=np.float64).reshape(-1, 3, 3)
    h = np.min(np.stack([cell_heights(c) for c in cells]), axis=0)
    n = [math.ceil(r_max / h[k]) if pbc[k] else 0 for k in range(3)]
    shifts = np.array(list(itertools.product(*[range(-m, m + 1) for m in n])), dtype=np.int64)
    order = np.argsort(np.abs(shifts).sum(axis=1), kind="stable")
    return shifts[order]


def _types(species) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted unique atomic numbers, type index per atom, count per type)."""
    species = np.asarray(species).reshape(-1)
    z, idx, counts = np.unique(species, return_inverse=True, return_counts=True)
    return z, idx.astype(np.int32), counts


def species_pairs(species) -> list[tuple[int, int]]:
    """All unordered element pairs ``(Za, Zb)``, ``Za <= Zb``, in sorted order."""
    z = np.unique(np.asarray(species))
    return [(int(a), int(b)) for i, a in enumerate(z) for b in z[i:]]


def stack_frames(frames, indices=None):
    """``(positions [T, N, 3], cells [T, 3, 3], pbc [3], numbers [N])`` of a :class:`Frames` set
    whose frames all have the same atoms in the same order (an MD trajectory or a dataset of one
    system)."""
    n = np.asarray(frames.n_atoms)
    idx = np.arange(len(n)) if indices is None else np.asarray(indices)
    if not np.all(n[idx] == n[idx[0]]):
        raise ValueError("stack_frames needs frames with a constant number of atoms")
    off = frames.offsets
    pos = np.stack([frames.positions[off[i] : off[i + 1]] for i in idx])
    num = np.stack([frames.numbers[off[i] : off[i + 1]] for i in idx])
    if not np.all(num == num[0]):
        raise ValueError("stack_frames needs the same atomic numbers in every frame")
    pbc = np.asarray(frames.pbc)[idx]
    if not np.all(pbc == pbc[0]):
        raise ValueError("stack_frames needs the same pbc in every frame")
    return pos, np.asarray(frames.cell)[idx], pbc[0], num[0]


# --------------------------------------------------------------------------------------------------
# pair histograms (RDF and h(r))
# --------------------------------------------------------------------------------------------------


def _pair_counts(positions, cells, pbc, type_idx, n_types, shifts, r_max, nbins, dr):
    """Ordered pair counts ``[T, n_types, n_types, nbins]`` over all images (traced).

    ``shifts=None``: minimum-image fast path, valid when ``r_max <= h_min / 2`` (then every pair
    within ``r_max`` has exactly one image, the one with fractional differences in ``[-1/2, 1/2)``).
    """
    positions = jnp.asarray(positions)
    fn = _pair_counts_fn(
        int(positions.shape[0]), int(positions.shape[1]), tuple(bool(b) for b in pbc),
        tuple(int(t) for t in type_idx), int(n_types),
        None if shifts is None else tuple(map(tuple, np.asarray(shifts).tolist())),
        float(r_max), int(nbins), float(dr), str(positions.dtype),
    )
    return fn(positions, cells.astype(positions.dtype))


@functools.lru_cache(maxsize=64)
def _pair_counts_fn(T, N, pbc, type_idx, n_types, shifts, r_max, nbins, dr, dtype):
    """A jitted per-trajectory pair counter for one static setup (cached: recompiles only when the
    shapes, species, images or bins change)."""
    min_image = shifts is None
    shifts = np.zeros((1, 3)) if min_image else np.asarray(shifts, dtype=np.float64).reshape(-1, 3)
    S = shifts.shape[0]
    type_idx = np.asarray(type_idx, dtype=np.int32)
    pbc_np = np.asarray(pbc, dtype=bool)
    periodic = bool(pbc_np.any())
    self_mask = np.eye(N, dtype=bool)[:, :, None] & (np.arange(S) == 0)[None, None, :]
    flat_base = ((type_idx[:, None] * n_types + type_idx[None, :]) * nbins)[:, :, None].astype(np.int32)
    size = n_types * n_types * nbins
    batch = max(1, min(T, _PAIR_BUDGET // max(1, N * N * S)))

    def one(args):
        x, cell = args
        if min_image:
            frac = jnp.linalg.solve(cell.T, x.T).T  # x = frac @ cell
            df = frac[None, :, :] - frac[:, None, :]
            df = jnp.where(pbc_np, df - jnp.round(df), df)
            d = (df @ cell)[:, :, None, :]
        else:
            if periodic:
                frac = jnp.linalg.solve(cell.T, x.T).T
                frac = jnp.where(pbc_np, frac - jnp.floor(frac), frac)
                x = frac @ cell
            d = x[None, :, None, :] - x[:, None, None, :] + (shifts.astype(x.dtype) @ cell)[None, None, :, :]
        dist = jnp.sqrt(jnp.sum(d * d, axis=-1))  # [N, N, S]
        valid = (dist < r_max) & ~self_mask
        k = jnp.clip(jnp.floor(dist / dr).astype(jnp.int32), 0, nbins - 1)
        flat = (flat_base + k).reshape(-1)
        c = jnp.zeros(size, x.dtype).at[flat].add(valid.reshape(-1).astype(x.dtype))
        return c.reshape(n_types, n_types, nbins)

    @jax.jit
    def counts(positions, cells):
        return jax.lax.map(one, (positions, cells), batch_size=batch)

    return counts


register_compiled(_pair_counts_fn.cache_clear)


def _prepare(positions, cell, pbc, r_max, n_images=None):
    positions = jnp.asarray(positions)
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise ValueError(f"positions must be [T, N, 3], got {positions.shape}")
    T = positions.shape[0]
    pbc = _pbc3(pbc)
    if cell is None:
        if pbc.any():
            raise ValueError("a cell is needed with periodic boundary conditions")
        cell = np.zeros((3, 3))
    if n_images is not None:
        n = [int(n_images[k]) if pbc[k] else 0 for k in range(3)]
        shifts = np.array(list(itertools.product(*[range(-m, m + 1) for m in n])), dtype=np.int64)
        shifts = shifts[np.argsort(np.abs(shifts).sum(axis=1), kind="stable")]
    else:
        try:
            cell_np = np.asarray(cell, dtype=np.float64)
        except jax.errors.TracerArrayConversionError as e:  # pragma: no cover - message only
            raise ValueError("the cell is traced: pass n_images (images per axis) explicitly") from e
        shifts = image_shifts(cell_np, pbc, r_max)
        if pbc.any():
            h = np.min(np.stack([cell_heights(c) for c in cell_np.reshape(-1, 3, 3)]), axis=0)
            if 2.0 * r_max <= h[pbc].min() * (1.0 - 1e-12):
                shifts = None  # minimum image suffices
    cells = jnp.broadcast_to(jnp.asarray(cell, dtype=positions.dtype).reshape(-1, 3, 3), (T, 3, 3))
    return positions, cells, pbc, shifts


def _masked_mean(x, frame_mask):
    """Mean over axis 0, restricted to frames where ``frame_mask`` is true."""
    if frame_mask is None:
        return jnp.mean(x, axis=0)
    w = jnp.asarray(frame_mask, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(x * w, axis=0) / jnp.sum(w)


def rdf_frames(positions, cell, pbc, species, r_max: float, dr: float, pairs=None, n_images=None):
    """Per-frame RDF: ``(r [nbins], g [T, nbins])``, or ``g [T, P, nbins]`` for ``pairs``.

    Args:
      positions: ``[T, N, 3]`` (wrapped or unwrapped), Å.
      cell: ``[3, 3]`` or ``[T, 3, 3]``, rows are lattice vectors (must be concrete unless
        ``n_images`` is given; its volume normalises g).
      pbc: bool or 3 bools; at least one periodic axis (for molecules use
        :func:`distance_histogram`).
      species: ``[N]`` atomic numbers (concrete).
      r_max, dr: histogram range and bin width (``r_max / dr`` an integer), Å.
      pairs: None for the total g(r); ``'all'`` for :func:`species_pairs`; or a sequence of
        ``(Za, Zb)``: true partials ``g_ab``.
      n_images: optional images per axis (overrides ``ceil(r_max / h_k)``).
    """
    pbc3 = _pbc3(pbc)
    if not pbc3.any():
        raise ValueError("rdf needs a periodic cell (a volume); use distance_histogram for molecules")
    nbins = _nbins(r_max, dr)
    positions, cells, pbc3, shifts = _prepare(positions, cell, pbc3, r_max, n_images)
    z, type_idx, n_per = _types(species)
    if len(type_idx) != positions.shape[1]:
        raise ValueError(f"species has {len(type_idx)} entries for {positions.shape[1]} atoms")
    counts = _pair_counts(positions, cells, pbc3, type_idx, len(z), shifts, r_max, nbins, dr)
    edges = np.arange(nbins + 1) * dr
    shell = jnp.asarray(4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3), positions.dtype)
    volume = jnp.abs(jnp.linalg.det(cells))[:, None]  # [T, 1]
    r = jnp.asarray(0.5 * (edges[1:] + edges[:-1]), positions.dtype)
    N = float(positions.shape[1])
    if pairs is None:
        g = jnp.sum(counts, axis=(1, 2)) * volume / (N * N * shell)
        return r, g
    if isinstance(pairs, str):
        if pairs != "all":
            raise ValueError(f"pairs must be None, 'all' or a list of (Za, Zb); got {pairs!r}")
        pairs = species_pairs(species)
    index = {int(a): i for i, a in enumerate(z)}
    out = []
    for za, zb in pairs:
        if int(za) not in index or int(zb) not in index:
            raise ValueError(f"pair ({za}, {zb}) not in species {z.tolist()}")
        a, b = index[int(za)], index[int(zb)]
        c = 0.5 * (counts[:, a, b] + counts[:, b, a])
        out.append(c * volume / (float(n_per[a]) * float(n_per[b]) * shell))
    return r, jnp.stack(out, axis=1)


def rdf(positions, cell, pbc, species, r_max: float, dr: float, pairs=None, frame_mask=None,
        n_images=None):
    """Frame-averaged RDF ``(r, g)``; see :func:`rdf_frames`. ``frame_mask [T]`` restricts the
    average (e.g. to the stable part, :func:`stable_mask`); a 2-D ``positions [N, 3]`` is one frame."""
    positions = jnp.asarray(positions)
    if positions.ndim == 2:
        positions = positions[None]
    r, g = rdf_frames(positions, cell, pbc, species, r_max, dr, pairs=pairs, n_images=n_images)
    return r, _masked_mean(g, frame_mask)


def distance_histogram_frames(positions, r_max: float, dr: float, cell=None, pbc=False, n_images=None):
    """Per-frame h(r) of FaNE eq. 1: ``(r [nbins], h [T, nbins])``, a density in 1/Å.

    ``h = counts(r) / (N (N - 1) dr)`` over ordered pairs ``i != j`` (all images within ``r_max`` if
    periodic, which then no longer integrates to 1)."""
    positions = jnp.asarray(positions)
    if positions.ndim == 2:
        positions = positions[None]
    nbins = _nbins(r_max, dr)
    positions, cells, pbc3, shifts = _prepare(positions, cell, pbc, r_max, n_images)
    N = positions.shape[1]
    counts = _pair_counts(positions, cells, pbc3, np.zeros(N, np.int32), 1, shifts, r_max, nbins, dr)
    edges = np.arange(nbins + 1) * dr
    r = jnp.asarray(0.5 * (edges[1:] + edges[:-1]), positions.dtype)
    return r, counts[:, 0, 0] / (N * (N - 1) * dr)


def distance_histogram(positions, r_max: float, dr: float, cell=None, pbc=False, frame_mask=None,
                       n_images=None):
    """Frame-averaged h(r) (FaNE eq. 1); see :func:`distance_histogram_frames`."""
    r, h = distance_histogram_frames(positions, r_max, dr, cell=cell, pbc=pbc, n_images=n_images)
    return r, _masked_mean(h, frame_mask)


# --------------------------------------------------------------------------------------------------
# RDF comparisons
# --------------------------------------------------------------------------------------------------


def wright_factor(g, g_ref, root: bool = True):
    """Wright's factor in percent over the last (bin) axis: ``100 sqrt(sum (g-g_ref)^2 / sum g_ref^2)``.

    ``root=False``: EGraFFBench eq. 2 as printed (no square root), times 100."""
    g, g_ref = jnp.asarray(g), jnp.asarray(g_ref)
    ratio = jnp.sum((g - g_ref) ** 2, axis=-1) / jnp.sum(g_ref**2, axis=-1)
    return 100.0 * (jnp.sqrt(ratio) if root else ratio)


def jensen_shannon(g, g_ref, base: float | None = None):
    """JSD (EGraFFBench eq. 3) of two RDFs normalised over the last axis, in nats (``base=2``: bits)."""
    g, g_ref = jnp.asarray(g), jnp.asarray(g_ref)
    p = g / jnp.sum(g, axis=-1, keepdims=True)
    q = g_ref / jnp.sum(g_ref, axis=-1, keepdims=True)
    m = 0.5 * (p + q)
    from jax.scipy.special import xlogy

    kl_pm = jnp.sum(xlogy(p, p) - xlogy(p, m), axis=-1)
    kl_qm = jnp.sum(xlogy(q, q) - xlogy(q, m), axis=-1)
    jsd = 0.5 * (kl_pm + kl_qm)
    return jsd / math.log(base) if base is not None else jsd


def rdf_mae(g, g_ref, dr: float):
    """Integrated absolute RDF difference (FaNE eq. 3): ``sum |g - g_ref| dr`` over the last axis."""
    return jnp.sum(jnp.abs(jnp.asarray(g) - jnp.asarray(g_ref)), axis=-1) * dr


# --------------------------------------------------------------------------------------------------
# energy / force violation
# --------------------------------------------------------------------------------------------------


def energy_violation(e_pred, e_ref):
    """EV(t) = (E_hat - E)^2 / (E_hat^2 + E^2), elementwise (EGraFFBench eq. 4)."""
    e_pred, e_ref = jnp.asarray(e_pred), jnp.asarray(e_ref)
    return (e_pred - e_ref) ** 2 / (e_pred**2 + e_ref**2)


def force_violation(f_pred, f_ref):
    """FV(t) = ||F_hat - F|| / (||F_hat|| + ||F||) with 2-norms over the last two axes ``[..., N, 3]``."""
    f_pred, f_ref = jnp.asarray(f_pred), jnp.asarray(f_ref)

    def norm(x):
        return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1)))

    return norm(f_pred - f_ref) / (norm(f_pred) + norm(f_ref))


def geometric_mean(x, axis=-1, eps: float = 0.0):
    """``exp(mean(log(max(x, eps))))`` along ``axis`` (0 if any value is 0 and ``eps == 0``)."""
    x = jnp.asarray(x)
    if eps > 0:
        x = jnp.maximum(x, eps)
    return jnp.exp(jnp.mean(jnp.log(x), axis=axis))


class ViolationSummary(NamedTuple):
    per_replica: jax.Array  # [R] geometric mean over time of each replica
    mean: jax.Array  # mean over replicas
    std: jax.Array  # standard deviation over replicas


def violation_summary(v, eps: float = 0.0, ddof: int = 0) -> ViolationSummary:
    """Geometric mean over time (last axis) of EV(t) or FV(t) ``[R, T]``, then mean/std over replicas."""
    v = jnp.asarray(v)
    if v.ndim == 1:
        v = v[None]
    gm = geometric_mean(v, axis=-1, eps=eps)
    return ViolationSummary(gm, jnp.mean(gm), jnp.std(gm, ddof=ddof))


# --------------------------------------------------------------------------------------------------
# stability
# --------------------------------------------------------------------------------------------------


def stable_mask(n_frames: int, t_unstable):
    """``[T]`` bool, true for frames before the first unstable frame (works with traced ``t``)."""
    return jnp.arange(n_frames) < t_unstable


def stability_rdf(g_frames, g_ref, dr: float, window: int, threshold: float = 1.0, stride: int = 1):
    """First unstable frame by FaNE eq. 8, or ``T`` if the trajectory stays stable.

    Args:
      g_frames: per-frame RDFs of the simulation, ``[T, nbins]`` or ``[T, P, nbins]`` (partials; the
        trajectory is unstable as soon as *any* of them exceeds), e.g. from :func:`rdf_frames`.
      g_ref: the reference equilibrium RDF(s), ``[nbins]`` or ``[P, nbins]``, same bins.
      window: tau in frames (FaNE: 1 ps).
      threshold: Delta (FaNE: 1.0 for LiPS, 3.0 for water).
      stride: frames between window starts (1: every frame).
    Returns: int array: the start ``T`` of the first window with ``rdf_mae > threshold``.
    """
    g_frames = jnp.asarray(g_frames)
    T = g_frames.shape[0]
    if window > T:
        raise ValueError(f"window {window} longer than the trajectory ({T} frames)")
    c = jnp.concatenate([jnp.zeros_like(g_frames[:1]), jnp.cumsum(g_frames, axis=0)], axis=0)
    starts = np.arange(0, T - window + 1, stride)
    avg = (c[starts + window] - c[starts]) / window  # [W, ...]
    dev = rdf_mae(avg, g_ref, dr)
    bad = dev > threshold
    if bad.ndim > 1:
        bad = jnp.any(bad.reshape(bad.shape[0], -1), axis=1)
    return jnp.where(jnp.any(bad), jnp.asarray(starts)[jnp.argmax(bad)], T)


def rdf_stability_hook(g_ref, cell, pbc, species, r_max: float, dr: float, window: int, threshold: float = 1.0,
                       pairs=None, n_images=None):
    """FaNE eq. 8 as an MD failure criterion (:class:`jaxbench.md.FailureHook`), evaluated inside the
    compiled rollout at every saved frame: a ring buffer of the last ``window`` per-frame RDFs lives in
    each replica's scan carry; once it is full, the replica fails when the RDF MAE of the window's
    average against ``g_ref`` exceeds ``threshold``. The failure is dated at the window's first frame,
    so the engine's stability time equals :func:`stability_rdf` (stride 1) on the same saved frames.

    Arguments as :func:`rdf_frames` / :func:`stability_rdf`; ``cell`` must be the (fixed) simulation
    cell, ``window`` is in saved frames (FaNE: 1 ps), the initial frame counts as the first.
    """
    from .md import FailureHook

    if window < 1:
        raise ValueError(f"window must be at least one frame, got {window}")
    g_ref = jnp.asarray(g_ref)

    def frame_g(position):
        _, g = rdf_frames(position[None], cell, pbc, species, r_max, dr, pairs=pairs, n_images=n_images)
        return g[0].astype(g_ref.dtype)

    def init(state):
        g = frame_g(state.position)
        buf = jnp.zeros((window,) + g.shape, g.dtype).at[0].set(g)
        return buf, jnp.ones((), jnp.int32)

    def update(mem, state):
        buf, n = mem
        buf = buf.at[n % window].set(frame_g(state.position))
        n = n + 1
        dev = rdf_mae(jnp.mean(buf, axis=0), g_ref, dr)
        failed = (n >= window) & jnp.any(dev > threshold)
        return (buf, n), failed, window - 1

    return FailureHook(init, update)


def covalent_bonds(positions, numbers, mult: float = 1.2) -> np.ndarray:
    """Bonds ``[B, 2]`` (``i < j``) with ``d_ij < mult (r_cov,i + r_cov,j)`` (ASE covalent radii) in
    one configuration ``[N, 3]`` — a relative tolerance, no additive neighbour-list skin.

    ``mult=1.0`` is too strict for real geometries: ASE's C-H radii sum is 1.07 Å against 1.09 Å
    bonds, and on thermal MD17 / acac / 3BPA frames it finds only 0-16 of the 8-28 chemical
    bonds. 1.1-1.25 finds exactly the chemical bonds on those frames (as does ASE's neighbour list
    with its default 0.3 Å skin per atom); 1.2 is the default. Raises if no bond is found."""
    from ase.data import covalent_radii

    x = np.asarray(positions, dtype=np.float64)
    rc = covalent_radii[np.asarray(numbers)]
    d = np.linalg.norm(x[None] - x[:, None], axis=-1)
    i, j = np.nonzero(np.triu(d < mult * (rc[:, None] + rc[None, :]), k=1))
    if len(i) == 0:
        raise ValueError(f"no covalent bond found with mult={mult}")
    return np.stack([i, j], axis=1)


def _bond_lengths(positions, bonds):
    x = jnp.asarray(positions)
    return jnp.linalg.norm(x[..., bonds[:, 1], :] - x[..., bonds[:, 0], :], axis=-1)


def bond_deviation(positions, bonds, bond_lengths):
    """``[T]`` max over bonds of ``|d_ij(t) - b_ij|`` (FaNE eq. 9)."""
    bonds = np.asarray(bonds)
    return jnp.max(jnp.abs(_bond_lengths(positions, bonds) - jnp.asarray(bond_lengths)), axis=-1)


def stability_bond(positions, numbers=None, threshold: float = 0.5, bonds=None, bond_lengths=None,
                   mult: float = 1.2):
    """First unstable frame by FaNE eq. 9 (molecules), or ``T``.

    Bonds default to :func:`covalent_bonds` of the first frame (needs ``numbers``; concrete
    positions), equilibrium lengths ``b_ij`` to their first-frame lengths. For ``vmap`` over
    replicas pass ``bonds`` (and ``bond_lengths``) explicitly.
    """
    positions = jnp.asarray(positions)
    T = positions.shape[0]
    if bonds is None:
        if numbers is None:
            raise ValueError("stability_bond needs numbers or bonds")
        bonds = covalent_bonds(np.asarray(positions[0]), numbers, mult=mult)
    bonds = np.asarray(bonds)
    if bond_lengths is None:
        bond_lengths = _bond_lengths(positions[0], bonds)
    bad = bond_deviation(positions, bonds, bond_lengths) > threshold
    return jnp.where(jnp.any(bad), jnp.argmax(bad), T)


# --------------------------------------------------------------------------------------------------
# MSD, diffusivity, conductivity
# --------------------------------------------------------------------------------------------------


def unwrap(positions, cell, pbc=True):
    """Unwrap a wrapped trajectory ``[T, N, 3]``: frame-to-frame displacements are taken to the
    minimum image (fractional steps rounded) along periodic axes and accumulated. Assumes no atom
    moves more than half a cell between frames. ``cell`` ``[3, 3]`` or ``[T, 3, 3]``."""
    x = jnp.asarray(positions)
    T = x.shape[0]
    cells = jnp.broadcast_to(jnp.asarray(cell, x.dtype).reshape(-1, 3, 3), (T, 3, 3))
    pbc3 = jnp.asarray(_pbc3(pbc))
    frac = jnp.einsum("tni,tij->tnj", x, jnp.linalg.inv(cells))
    dfrac = jnp.diff(frac, axis=0)
    dfrac = jnp.where(pbc3, dfrac - jnp.round(dfrac), dfrac)
    # displacement in Cartesian with the cell of the later frame (exact for a fixed cell)
    dx = jnp.einsum("tnj,tjk->tnk", dfrac, cells[1:])
    return jnp.concatenate([x[:1], x[:1] + jnp.cumsum(dx, axis=0)], axis=0)


def _atom_mask(n_atoms, species, select):
    if select is None:
        return np.ones(n_atoms, bool)
    species = np.asarray(species)
    if species.shape != (n_atoms,):
        raise ValueError("species [N] is needed to select atoms by element")
    return np.isin(species, np.atleast_1d(select))


def msd(positions, species=None, select=None):
    """MSD(t) from time origin 0 (FaNE eq. 4), ``[T]``, over atoms of element(s) ``select``.

    ``positions`` must be unwrapped (:func:`unwrap`). With ``species`` and ``select='each'``:
    ``[n_species, T]`` for the sorted unique species."""
    x = jnp.asarray(positions)
    if isinstance(select, str) and select == "each":
        return jnp.stack([msd(x, species, int(z)) for z in np.unique(species)])
    mask = _atom_mask(x.shape[1], species, select)
    d = x[:, mask] - x[:1, mask]
    return jnp.mean(jnp.sum(d * d, axis=-1), axis=-1)


def msd_lags(positions, window: int, equilibration: int = 0, species=None, select=None):
    """Origin-averaged MSD at lags ``0 .. window-1``: ``[window]``; origins ``t0 = eq .. T - window``."""
    x = jnp.asarray(positions)
    mask = _atom_mask(x.shape[1], species, select)
    x = x[equilibration:, mask]
    T = x.shape[0]
    n_orig = T - window + 1
    if n_orig < 1:
        raise ValueError(f"window {window} + equilibration {equilibration} exceed {T + equilibration} frames")

    def at_lag(lag):
        a = jax.lax.dynamic_slice_in_dim(x, lag, n_orig, axis=0)
        d = a - x[:n_orig]
        return jnp.mean(jnp.sum(d * d, axis=-1))

    return jax.lax.map(at_lag, jnp.arange(window))


def diffusivity(positions, dt_fs: float, window: int, equilibration: int = 0, species=None,
                select=None):
    """Self-diffusivity in cm^2/s by sliding-window MSD slopes (FaNE App. A).

    For every window ``[t0, t0 + window)`` with ``t0 = equilibration .. T - window`` the
    least-squares slope (with intercept) of ``MSD_t0(tau) = <|x(t0 + tau) - x(t0)|^2>`` against
    ``tau dt`` is divided by 6, and the windows are averaged (computed exactly as the slope of the
    origin-averaged MSD, :func:`msd_lags`). ``positions`` unwrapped ``[T, N, 3]`` in Å, ``dt_fs``
    the time between frames in fs; ``window`` and ``equilibration`` in frames; ``select`` an element
    (or list) to track, e.g. 3 for Li.
    """
    if window < 2:
        raise ValueError("window must be at least 2 frames")
    m = msd_lags(positions, window, equilibration, species, select)
    t = np.arange(window) * float(dt_fs)
    tc = t - t.mean()
    slope = jnp.sum(jnp.asarray(tc / np.sum(tc * tc), m.dtype) * m)  # Å^2/fs
    return slope / 6.0 * A2_PER_FS_TO_CM2_PER_S


def nernst_einstein_conductivity(D_cm2_s, number_density_A3, temperature, charge: float = 1.0,
                                 haven_ratio: float = 1.0):
    """Ionic conductivity in S/cm: ``n (z e)^2 D / (H_R k_B T)``.

    ``D`` in cm^2/s (:func:`diffusivity`), ``number_density_A3`` carriers per Å^3 (``n_Li / V``),
    ``temperature`` in K. Multiply by 1000 for mS/cm."""
    n_cm3 = jnp.asarray(number_density_A3) / _A3_TO_CM3
    q = charge * E_CHARGE
    return n_cm3 * q * q * jnp.asarray(D_cm2_s) / (haven_ratio * K_B_J * jnp.asarray(temperature))


def neg_log10_conductivity(sigma_S_cm, unit: str = "mS/cm"):
    """``-log10(sigma)`` in ``unit`` ('mS/cm', the GraNNField Table 2 reading, or 'S/cm')."""
    scale = {"mS/cm": 1e3, "S/cm": 1.0}[unit]
    return -jnp.log10(jnp.asarray(sigma_S_cm) * scale)


class ArrheniusFit(NamedTuple):
    activation_energy: jax.Array  # eV
    prefactor: jax.Array  # A in sigma T = A exp(-Ea / kT) [S K / cm] (or sigma = A exp(..): S/cm)
    sigma_target: jax.Array  # extrapolated sigma at target_T, S/cm


def arrhenius_fit(temperatures, sigma, target_T: float = 300.0, quantity: str = "sigma_T") -> ArrheniusFit:
    """Least-squares Arrhenius fit and extrapolation.

    ``quantity='sigma_T'`` (default, Nernst–Einstein form): ``ln(sigma T) = ln A - E_a / (k_B T)``;
    ``'sigma'``: ``ln sigma = ln A - E_a / (k_B T)``. ``sigma`` in S/cm, ``E_a`` in eV."""
    T = jnp.asarray(temperatures, dtype=jnp.result_type(float))
    s = jnp.asarray(sigma, dtype=T.dtype)
    if quantity == "sigma_T":
        y = jnp.log(s * T)
    elif quantity == "sigma":
        y = jnp.log(s)
    else:
        raise ValueError(f"quantity must be 'sigma_T' or 'sigma', got {quantity!r}")
    x = 1.0 / T
    xc = x - jnp.mean(x)
    slope = jnp.sum(xc * (y - jnp.mean(y))) / jnp.sum(xc * xc)
    intercept = jnp.mean(y) - slope * jnp.mean(x)
    y_t = intercept + slope / target_T
    sigma_t = jnp.exp(y_t) / target_T if quantity == "sigma_T" else jnp.exp(y_t)
    return ArrheniusFit(-slope * K_B_EV, jnp.exp(intercept), sigma_t)


# --------------------------------------------------------------------------------------------------
# RMSD, errors, speed
# --------------------------------------------------------------------------------------------------


def _kabsch_rmsd(x, ref):
    x = x - jnp.mean(x, axis=0)
    ref = ref - jnp.mean(ref, axis=0)
    h = x.T @ ref
    u, _, vt = jnp.linalg.svd(h)
    d = jnp.sign(jnp.linalg.det(u @ vt))
    u = u.at[:, -1].multiply(d)
    rot = u @ vt  # x @ rot best matches ref
    diff = x @ rot - ref
    return jnp.sqrt(jnp.mean(jnp.sum(diff * diff, axis=-1)))


def rmsd(positions, reference=None, align: bool = False):
    """RMSD ``[T]`` of each frame from ``reference [N, 3]`` (default: the first frame), Å.

    ``align=True``: after optimal translation + rotation (Kabsch; molecules only — leave it off for
    periodic systems, where positions should be unwrapped instead)."""
    x = jnp.asarray(positions)
    ref = x[0] if reference is None else jnp.asarray(reference)
    if align:
        return jax.vmap(_kabsch_rmsd, in_axes=(0, None))(x, ref)
    d = x - ref
    return jnp.sqrt(jnp.mean(jnp.sum(d * d, axis=-1), axis=-1))


def energy_mae(e_pred, e_ref, n_atoms=None):
    """Energy MAE in meV (``n_atoms`` given: of the energy per atom, meV/atom); energies in eV."""
    diff = jnp.asarray(e_pred) - jnp.asarray(e_ref)
    if n_atoms is not None:
        diff = diff / jnp.asarray(n_atoms)
    return 1000.0 * jnp.mean(jnp.abs(diff))


def force_mae(f_pred, f_ref):
    """Force MAE in meV/Å over all components; forces in eV/Å."""
    return 1000.0 * jnp.mean(jnp.abs(jnp.asarray(f_pred) - jnp.asarray(f_ref)))


class Speed(NamedTuple):
    atom_steps_per_s: float
    ns_per_day: float
    us_per_step_atom: float


def speed(n_atoms: int, n_steps: int, seconds: float, dt_fs: float) -> Speed:
    """Inference speed: atom-steps/s, ns of simulated time per day, and µs per step per atom."""
    atom_steps = float(n_atoms) * float(n_steps)
    return Speed(
        atom_steps_per_s=atom_steps / seconds,
        ns_per_day=float(n_steps) * dt_fs * 1e-6 / seconds * 86400.0,
        us_per_step_atom=seconds * 1e6 / atom_steps,
    )
