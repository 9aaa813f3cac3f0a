"""Energy models as the engine sees them: ``fn(params, graph) -> energy``, plus two analytic pair potentials.

Every kind of model a user hands over (a ``Potential`` with params, a plain callable) becomes one
:class:`EnergyModel`, so the engine compiles one calling convention. The toy potentials are for tests,
oracles and demos: cheap, smooth and differentiable in their params.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from ..errors import DataError, JaxbenchError


@dataclasses.dataclass(frozen=True, eq=False)
class EnergyModel:
    """``fn(params, graph) -> scalar`` energy (eV) of a single-structure graph from
    :func:`jaxbench.graph.md_graph` (edges within ``cutoff``; positions are ``graph.positions``)."""

    fn: Callable
    cutoff: float
    params: Any = None
    species: tuple | None = None
    name: str = "energy"
    check_species: Callable | None = None
    ident: Any = None  # identity for caching compiled code (default: the function object)

    @property
    def key(self):
        return self.ident if self.ident is not None else ("fn", id(self.fn))

    def check(self, numbers, where: str = "") -> None:
        if self.check_species is not None:
            self.check_species(numbers, where=where)
        elif self.species is not None:
            from ase.data import chemical_symbols

            bad = sorted(set(np.unique(numbers).tolist()) - set(self.species))
            if bad:
                raise DataError(
                    f"model '{self.name}' cannot represent {', '.join(chemical_symbols[z] for z in bad)}"
                    + (f" ({where})" if where else "")
                )


def as_energy_model(obj, params=None, cutoff: float | None = None) -> EnergyModel:
    """An :class:`EnergyModel` from a ``Potential`` (with ``params``), an EnergyModel, or a callable.

    A callable is ``fn(params, graph) -> scalar`` when ``params`` is given, else ``fn(graph) ->
    scalar``; it needs ``cutoff`` (Å).
    """
    from ..potential import Potential

    if isinstance(obj, EnergyModel):
        return obj if params is None else dataclasses.replace(obj, params=params)
    if isinstance(obj, Potential):
        if params is None:
            raise JaxbenchError("a Potential needs its params")
        pot = obj
        return EnergyModel(
            fn=lambda p, g: pot.energy(p, g)[0],
            cutoff=pot.r_max,
            params=params,
            species=pot.species,
            name=pot.name,
            check_species=pot.check_species,
            ident=("potential", id(pot)),
        )
    if callable(obj):
        if cutoff is None:
            raise JaxbenchError("an energy function needs its cutoff (Å)")
        if params is None:
            return EnergyModel(fn=lambda p, g: obj(g), cutoff=float(cutoff), params={}, name=getattr(obj, "__name__", "energy"),
                               ident=("graph_fn", id(obj)))
        return EnergyModel(fn=obj, cutoff=float(cutoff), params=params, name=getattr(obj, "__name__", "energy"))
    raise JaxbenchError(f"cannot make an energy model from {type(obj).__name__}")


def pair_r(graph, cutoff):
    """Pair distances [E] of a graph's edges and the mask of those within ``cutoff`` (masked ones read ``cutoff``)."""
    import jax.numpy as jnp

    from ..graph import edge_vectors

    vec = edge_vectors(graph, pad_length=2.0 * cutoff)
    r2 = jnp.sum(vec * vec, axis=-1)
    inside = graph.edge_mask & (r2 < cutoff * cutoff)
    r = jnp.sqrt(jnp.where(inside, r2, cutoff * cutoff))
    return r, inside


def lennard_jones(sigma: float = 3.405, epsilon: float = 0.0104, cutoff: float = 8.5) -> EnergyModel:
    """Force-shifted Lennard-Jones (energy and force continuous at the cutoff; argon defaults).
    Params ``{'sigma', 'epsilon'}`` (differentiable)."""
    import jax.numpy as jnp

    rc = float(cutoff)

    def fn(p, graph):
        r, inside = pair_r(graph, rc)
        s, e = p["sigma"], p["epsilon"]
        lj = lambda x: 4 * e * ((s / x) ** 12 - (s / x) ** 6)  # noqa: E731
        dlj = lambda x: 4 * e * (-12 * s**12 / x**13 + 6 * s**6 / x**7)  # noqa: E731
        pair = lj(r) - lj(rc) - (r - rc) * dlj(rc)
        return 0.5 * jnp.sum(jnp.where(inside, pair, 0.0))

    return EnergyModel(fn=fn, cutoff=rc, params={"sigma": jnp.asarray(sigma), "epsilon": jnp.asarray(epsilon)}, name="lennard_jones")


def morse(D: float = 0.5, alpha: float = 1.5, r0: float = 2.5, cutoff: float = 5.0) -> EnergyModel:
    """Morse pair potential, one parameter set for all species, smoothly switched off
    (cosine switch over the last 1 Å before ``cutoff``). Params ``{'D', 'alpha', 'r0'}``."""
    import jax.numpy as jnp

    rc = float(cutoff)
    ron = rc - 1.0

    def fn(p, graph):
        r, inside = pair_r(graph, rc)
        x = jnp.exp(-p["alpha"] * (r - p["r0"]))
        pair = p["D"] * (x * x - 2 * x)
        t = jnp.clip((r - ron) / (rc - ron), 0.0, 1.0)
        sw = 0.5 * (1 + jnp.cos(jnp.pi * t))
        return 0.5 * jnp.sum(jnp.where(inside, pair * sw, 0.0))

    return EnergyModel(
        fn=fn, cutoff=rc, params={"D": jnp.asarray(D), "alpha": jnp.asarray(alpha), "r0": jnp.asarray(r0)}, name="morse"
    )
