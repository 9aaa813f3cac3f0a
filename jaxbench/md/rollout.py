"""Differentiable rollouts: MD as a pure function of the parameters, for training through dynamics.

Unlike :func:`jaxbench.md.simulate` nothing is frozen, written or checked on the host: one replica,
one neighbor list allocated up front. Each chunk is ``jax.checkpoint``-ed, so ``jax.grad`` through a
long rollout keeps one carry per chunk plus one chunk of intermediates instead of every step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import JaxbenchError
from .engine import Engine, require_x64
from .potentials import EnergyModel, as_energy_model
from .protocol import FS_PER_TIME_UNIT, Protocol


def make_rollout(
    model,
    numbers,
    cell,
    pbc,
    protocol: Protocol,
    reference_positions,
    chunk_steps: int = 10,
    capacity_multiplier: float = 2.0,
    cutoff: float | None = None,
    remat: bool = True,
):
    """A pure, differentiable rollout ``f(params, positions, velocities, key) -> dict`` of
    ``protocol.steps`` steps (single replica, no failure freezing, nothing written).

    Returns per step ``potential_energy`` [S], ``kinetic_energy`` [S], ``positions`` at every
    ``protocol.save_every`` steps [S / save_every, N, 3], plus ``did_overflow`` (check it on the
    host: the list is allocated once here from ``reference_positions`` with ``capacity_multiplier``).
    Each chunk of ``chunk_steps`` steps is wrapped in ``jax.checkpoint`` when ``remat``: reverse mode
    stores one carry per chunk and recomputes a chunk's steps during the backward pass.
    Gradients flow through positions and ``params``; the neighbor indices are piecewise constant.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    from ..neighbors import md_neighbor_list

    require_x64()
    protocol = protocol.validate()
    # params are given at call time: a placeholder here (callables are fn(params, graph))
    em = model if isinstance(model, EnergyModel) else as_energy_model(model, params={}, cutoff=cutoff)
    steps = int(protocol.steps)
    if steps % chunk_steps or chunk_steps % protocol.save_every:
        raise JaxbenchError(f"steps ({steps}) must be a multiple of chunk_steps ({chunk_steps}), itself a multiple of save_every")
    numbers = np.asarray(numbers, np.int32)
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,))
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64)
    nl = md_neighbor_list(cell, pbc, em.cutoff, skin=protocol.skin, capacity_multiplier=capacity_multiplier,
                          compact_edges=protocol.skin > 0)
    nbrs0 = nl.allocate(np.asarray(reference_positions, np.float64))
    eng = Engine(protocol, em, numbers, cell, pbc, nl, None, "map")
    init_fn, apply_fn = eng.integrator()
    mass = eng.masses
    every = int(protocol.save_every)

    def rollout(params, positions, velocities, key=None):
        key = jax.random.PRNGKey(0) if key is None else key
        nbrs = nl.update(positions, dataclasses.replace(nbrs0, reference_positions=jnp.full_like(positions, jnp.inf)))
        momenta = velocities * FS_PER_TIME_UNIT * mass[:, None]
        state = init_fn(key, positions, mass=mass, kT=protocol.kT, momenta=momenta, neighbor=nbrs, params=params)

        def step(c, _):
            state, nbrs = c
            state = apply_fn(state, neighbor=nbrs, params=params)
            nbrs = nl.update(state.position, nbrs)
            pe = eng.energy(state.position, neighbor=nbrs, params=params)
            ke = 0.5 * jnp.sum(state.momentum**2 / state.mass)
            return (state, nbrs), (pe, ke)

        def chunk_saving(c, _):
            def inner(c, _):
                c, (pe, ke) = lax.scan(step, c, None, length=every)
                return c, (pe, ke, c[0].position)

            c, (pe, ke, pos) = lax.scan(inner, c, None, length=chunk_steps // every)
            return c, (pe.reshape(-1), ke.reshape(-1), pos)

        body = jax.checkpoint(chunk_saving) if remat else chunk_saving
        (state, nbrs), (pe, ke, pos) = lax.scan(body, (state, nbrs), None, length=steps // chunk_steps)
        return dict(
            potential_energy=pe.reshape(-1),
            kinetic_energy=ke.reshape(-1),
            positions=pos.reshape(-1, *positions.shape),
            did_overflow=nbrs.did_overflow,
        )

    return rollout
