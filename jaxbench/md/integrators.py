"""The integrator of a protocol: jax-md's ``(init_fn, apply_fn)`` pair for its ensemble.

One place maps a :class:`Protocol` to the pair, so new ensembles (NPT) or a bias on the energy
(metadynamics) plug in here without touching the engine, which only calls ``init_fn`` and ``apply_fn``.
"""

from __future__ import annotations

from typing import Callable

from .protocol import Protocol


def integrator(protocol: Protocol, energy_fn: Callable):
    """``(init_fn, apply_fn)`` of jax-md for ``protocol.ensemble``, in jax-md units, positions unwrapped."""
    from jax_md import simulate, space

    _, shift = space.free()  # positions stay unwrapped
    if protocol.ensemble == "nve":
        return simulate.nve(energy_fn, shift, dt=protocol.dt)
    if protocol.ensemble == "nvt_langevin":
        return simulate.nvt_langevin(energy_fn, shift, dt=protocol.dt, kT=protocol.kT, gamma=protocol.gamma)
    return simulate.nvt_nose_hoover(
        energy_fn, shift, dt=protocol.dt, kT=protocol.kT, chain_length=int(protocol.chain_length), tau=protocol.tau
    )
