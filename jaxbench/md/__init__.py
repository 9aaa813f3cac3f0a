"""Molecular dynamics on jax-md: compiled, batched over replicas, crash-safe, differentiable.

Units: Å, eV, amu, fs, K (jax-md's time unit is converted on the :class:`Protocol`). Velocities on disk
are Å/fs; positions are Cartesian and never wrapped. Temperature uses 3N degrees of freedom (as jax-md's
thermostats and ASE do). The saved ``conserved_energy`` is PE + KE for NVE, the Nosé–Hoover-chain
invariant (PE + KE + thermostat energy) for NVT Nosé–Hoover, and plain PE + KE (not conserved) for
Langevin.

The package is split by what changes together: ``protocol`` (settings, cards), ``potentials`` (energy
models), ``start`` (initial replicas), ``failures`` (criteria), ``integrators`` (ensemble -> jax-md pair),
``engine`` (the compiled chunk, no IO), ``driver`` (the host loop, :func:`simulate`) and ``rollout``
(differentiable rollouts). Everything public is re-exported here.
"""

from __future__ import annotations

from . import bias, integrators  # noqa: F401  (where new ensembles and biases plug in)
from .driver import MDResult, simulate
from .engine import jax_jit
from .failures import BOND_STRETCH, FAILURE_REASONS, PADDING_REPLICA, T_MAX, T_MIN, FailureHook, describe_failure
from .potentials import EnergyModel, as_energy_model, lennard_jones, morse
from .protocol import (
    ENSEMBLES,
    FS_PER_TIME_UNIT,
    KB_EV_PER_K,
    MAX_TIMESTEP_FS,
    SIMS_DIR,
    MetadynamicsSettings,
    Protocol,
    load_protocol,
    protocol_cards,
)
from .rollout import make_rollout
from .start import MIN_DISTANCE, Start, replica_keys, start_from_frames

__all__ = [
    "FS_PER_TIME_UNIT",
    "KB_EV_PER_K",
    "ENSEMBLES",
    "FAILURE_REASONS",
    "Protocol",
    "EnergyModel",
    "as_energy_model",
    "lennard_jones",
    "morse",
    "Start",
    "start_from_frames",
    "MDResult",
    "FailureHook",
    "simulate",
    "make_rollout",
    "load_protocol",
    "protocol_cards",
]
