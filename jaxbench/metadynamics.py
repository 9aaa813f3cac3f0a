"""Metadynamics: a history-dependent bias on collective variables, in pure JAX (Laio & Parrinello 2002).

The bias is a sum of Gaussians ("hills") deposited along the trajectory in the space of collective
variables (CVs). Everything here is a pure function of a small state, so it lives inside a compiled
`lax.scan` with static shapes:

- `Metadynamics` holds the static settings: the CV function (any JAX function of positions), widths,
  height, deposition pace, buffer size, which CVs are periodic, and the well-tempered bias factor.
- `Hills` is the carried state: a fixed-size buffer of centres and heights, the number used, and a flag
  that is set when a deposit found the buffer full. A full buffer is a named condition: the deposit is
  dropped, `Hills.full` stays True, and `check_hills` raises `HillBufferFull` on the host; nothing is
  truncated silently.
- `biased_energy(energy_fn, meta)` adds the bias to any energy function, so bias forces come from the
  same `jax.grad` as the model's forces.
- `fes(meta, hills, grid)` estimates the free-energy surface from the bias (plain: F = -V; well-tempered:
  F = -gamma / (gamma - 1) V, Barducci, Bussi & Parrinello 2008).

Units follow the caller's energy function (eV in jaxbench). FaNE's alanine protocol (height 1.2 kJ/mol,
width 0.35 rad, a hill every 1 ps) converts with `KJ_PER_MOL_IN_EV`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import JaxbenchError

KJ_PER_MOL_IN_EV = 0.010364269656262174  # 1 kJ/mol in eV (CODATA 2018, as ase.units)


class HillBufferFull(JaxbenchError, RuntimeError):
    """A deposit found the fixed-size hill buffer full (raise `max_hills` or the pace)."""


class Hills(NamedTuple):
    centers: jax.Array  # [max_hills, n_cv]
    heights: jax.Array  # [max_hills], energy units; unused slots are 0
    count: jax.Array  # int32 scalar: slots in use
    full: jax.Array  # bool scalar: a deposit was dropped because the buffer was full


@dataclasses.dataclass(frozen=True, eq=False)
class Metadynamics:
    """Static settings of a metadynamics bias (hashable by identity, safe as a jit static argument).

    cv_fn: positions -> [n_cv] collective variables. sigma: Gaussian widths per CV (CV units).
    height: initial hill height (energy units). pace: steps between deposits. max_hills: buffer size.
    periodic: per CV, the period (e.g. 2 pi for a dihedral) or None. bias_factor: gamma of well-tempered
    metadynamics (None: plain metadynamics). kT: thermal energy, needed for well-tempered.
    """

    cv_fn: Callable
    sigma: tuple[float, ...]
    height: float
    pace: int
    max_hills: int
    periodic: tuple[float | None, ...]
    bias_factor: float | None = None
    kT: float | None = None

    def __post_init__(self):
        if len(self.sigma) != len(self.periodic):
            raise ValueError(f"metadynamics: {len(self.sigma)} widths but {len(self.periodic)} periodicity entries")
        if min(self.sigma) <= 0 or self.height <= 0 or self.pace < 1 or self.max_hills < 1:
            raise ValueError("metadynamics: sigma and height must be > 0, pace and max_hills >= 1")
        if self.bias_factor is not None and (self.bias_factor <= 1 or not self.kT or self.kT <= 0):
            raise ValueError("metadynamics: well-tempered needs bias_factor > 1 and kT > 0")

    @property
    def n_cv(self) -> int:
        return len(self.sigma)


def init_hills(meta: Metadynamics, dtype=None) -> Hills:
    dtype = dtype or jnp.zeros(()).dtype
    return Hills(centers=jnp.zeros((meta.max_hills, meta.n_cv), dtype), heights=jnp.zeros((meta.max_hills,), dtype),
                 count=jnp.zeros((), jnp.int32), full=jnp.zeros((), bool))


def cv_difference(meta: Metadynamics, a, b):
    """a - b per CV, wrapped to [-period/2, period/2) for periodic CVs."""
    d = a - b
    periods = [p for p in meta.periodic]
    if any(p is not None for p in periods):
        period = jnp.asarray([p if p is not None else 0.0 for p in periods], d.dtype)
        wrapped = d - period * jnp.round(d / jnp.where(period > 0, period, 1.0))
        d = jnp.where(period > 0, wrapped, d)
    return d


def bias_at(meta: Metadynamics, hills: Hills, s):
    """Bias energy V(s) at one CV point s [n_cv] (unused buffer slots have height 0)."""
    d = cv_difference(meta, s[None, :], hills.centers) / jnp.asarray(meta.sigma, s.dtype)
    return jnp.sum(hills.heights * jnp.exp(-0.5 * jnp.sum(d * d, axis=-1)))


def biased_energy(energy_fn: Callable, meta: Metadynamics) -> Callable:
    """energy_fn(positions, **kw) -> energy_fn + V(cv(positions)); pass `hills=` at call time."""

    def energy(positions, hills: Hills, **kwargs):
        return energy_fn(positions, **kwargs) + bias_at(meta, hills, meta.cv_fn(positions))

    return energy


def deposit(meta: Metadynamics, hills: Hills, positions) -> Hills:
    """Add one hill at cv(positions); well-tempered heights shrink as exp(-V / (kT (gamma - 1)))."""
    s = meta.cv_fn(positions)
    height = jnp.asarray(meta.height, hills.heights.dtype)
    if meta.bias_factor is not None:
        height = height * jnp.exp(-bias_at(meta, hills, s) / (meta.kT * (meta.bias_factor - 1.0)))
    has_room = hills.count < meta.max_hills
    slot = jnp.minimum(hills.count, meta.max_hills - 1)
    centers = jnp.where(has_room, hills.centers.at[slot].set(s.astype(hills.centers.dtype)), hills.centers)
    heights = jnp.where(has_room, hills.heights.at[slot].set(height), hills.heights)
    return Hills(centers, heights, hills.count + has_room.astype(jnp.int32), hills.full | ~has_room)


def maybe_deposit(meta: Metadynamics, hills: Hills, positions, step) -> Hills:
    """Deposit when `step` (1-based count of steps taken) is a multiple of the pace; else unchanged."""
    new = deposit(meta, hills, positions)
    due = (step % meta.pace) == 0
    return jax.tree.map(lambda a, b: jnp.where(due, a, b), new, hills)


def check_hills(hills: Hills, where: str = "metadynamics") -> None:
    """Host-side check after a chunk: a dropped deposit is an error, never silent truncation."""
    full = np.asarray(hills.full)
    if full.any():
        which = np.flatnonzero(full.reshape(-1)).tolist() if full.ndim else []
        raise HillBufferFull(f"{where}: the hill buffer ({np.asarray(hills.heights).shape[-1]} hills) is full"
                             + (f" in replicas {which}" if which else "")
                             + "; a deposit was dropped. Raise max_hills or the deposition pace.")


def fes(meta: Metadynamics, hills: Hills, grid):
    """Free-energy estimate on grid points [G, n_cv], shifted to min 0 (same energy unit as the bias)."""
    v = jax.vmap(lambda s: bias_at(meta, hills, s))(jnp.asarray(grid))
    factor = 1.0 if meta.bias_factor is None else meta.bias_factor / (meta.bias_factor - 1.0)
    f = -factor * v
    return f - jnp.min(f)


def dihedral(p0, p1, p2, p3):
    """Dihedral angle (rad, in (-pi, pi]) of four points, IUPAC sign convention (as OpenMM's torsion
    `theta` and ase.Atoms.get_dihedral modulo 2 pi)."""
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = jnp.cross(b1, b2), jnp.cross(b2, b3)
    return jnp.arctan2(jnp.linalg.norm(b2) * jnp.dot(b1, n2), jnp.dot(n1, n2))


def dihedral_cv(*quadruples: tuple[int, int, int, int]) -> Callable:
    """CV function: the dihedral angles of the given atom index quadruples, e.g. phi and psi."""
    idx = np.asarray(quadruples, dtype=int)

    def cv(positions):
        p = positions[idx]  # [n_cv, 4, 3]
        return jax.vmap(lambda q: dihedral(q[0], q[1], q[2], q[3]))(p)

    return cv


def free_energy_1d(samples, bins: int, kT: float, range_=(-np.pi, np.pi), weights=None):
    """F(x) = -kT ln p(x) (FaNE eq. 5) from samples on a 1-D grid, shifted to min 0; empty bins are inf."""
    hist, edges = np.histogram(np.asarray(samples).ravel(), bins=bins, range=range_, density=True,
                               weights=None if weights is None else np.asarray(weights).ravel())
    with np.errstate(divide="ignore"):
        f = -kT * np.log(hist)
    f = f - np.min(f[np.isfinite(f)]) if np.isfinite(f).any() else f
    return 0.5 * (edges[1:] + edges[:-1]), f


def fes_mae(grid, f_ref, f_model, period: float | None = 2 * np.pi) -> dict:
    """FaNE eq. 6-7: the integral over the grid of |F - F_hat| (both shifted to min 0).

    Returns the integral (energy x CV units, FaNE's number) and its mean over the interval (energy units).
    Grid points where either surface is not finite (never visited) are excluded and counted.
    """
    grid, f_ref, f_model = (np.asarray(a, float) for a in (grid, f_ref, f_model))
    ok = np.isfinite(f_ref) & np.isfinite(f_model)
    if not ok.any():
        return dict(integral=None, mean=None, points=0, excluded=int(grid.size))
    a, b = f_ref - np.min(f_ref[ok]), f_model - np.min(f_model[ok])
    spacing = np.diff(grid).mean() if grid.size > 1 else 1.0
    integral = float(np.sum(np.abs(a - b)[ok]) * spacing)
    length = period if period is not None else spacing * grid.size
    return dict(integral=integral, mean=integral / (spacing * ok.sum()) if ok.any() else None,
                covered=float(ok.sum() * spacing / length), points=int(ok.sum()), excluded=int((~ok).sum()))
