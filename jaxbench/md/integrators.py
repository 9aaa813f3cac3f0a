"""The integrator of a protocol: jax-md's ``(init_fn, apply_fn)`` pair for its ensemble.

One place maps a :class:`Protocol` to the pair, so new ensembles (NPT) or a bias on the energy
(metadynamics) plug in here without touching the engine, which only calls ``init_fn`` and ``apply_fn``.
"""

from __future__ import annotations

from typing import Callable

from .protocol import Protocol


def integrator(protocol: Protocol, energy_fn: Callable):
    """``(init_fn, apply_fn)`` of jax-md for ``protocol.ensemble``, in jax-md units, positions unwrapped."""
    import jax.numpy as jnp
    from jax_md import simulate, space

    _, shift = space.free()  # positions stay unwrapped
    if protocol.ensemble == "nve":
        return simulate.nve(energy_fn, shift, dt=protocol.dt)
    if protocol.ensemble == "nvt_langevin":
        return simulate.nvt_langevin(energy_fn, shift, dt=protocol.dt, kT=protocol.kT, gamma=protocol.gamma)
    if protocol.ensemble == "npt_nose_hoover":
        # jax-md's MTK integrator scales R by exp(x) with the cell (exp_iL1) and shifts it by a Cartesian dR:
        # with unwrapped Cartesian positions that is plain addition (the neighbour list works in positions
        # scaled back to the start cell, see Engine.list_positions); its documented fractional-coordinate
        # route would wrap positions and lose the unwrapped trajectory that MSD needs
        # tau as arrays: a Python float becomes a weak-typed leaf of the chains' state, which a resumed
        # (restored, strongly typed) state would not match
        taus = jnp.asarray(protocol.barostat_tau, jnp.float64), jnp.asarray(protocol.tau, jnp.float64)
        return simulate.npt_nose_hoover(
            energy_fn, lambda R, dR, **unused: R + dR, dt=protocol.dt, pressure=protocol.pressure, kT=protocol.kT,
            barostat_kwargs=dict(chain_length=int(protocol.chain_length), tau=taus[0]),
            thermostat_kwargs=dict(chain_length=int(protocol.chain_length), tau=taus[1]))
    return simulate.nvt_nose_hoover(
        energy_fn, shift, dt=protocol.dt, kT=protocol.kT, chain_length=int(protocol.chain_length), tau=protocol.tau
    )
