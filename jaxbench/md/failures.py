"""When a replica has failed: the built-in criteria, user criteria (:class:`FailureHook`) and the bit mask.

Failures are results, never exceptions: they are checked per replica inside the compiled scan, every
step for the built-in criteria (non-finite positions / momenta / forces, temperature outside
[0.1, 1e5] K, a molecule's bond stretched by more than 0.5 Å) and at every saved frame for a user
criterion. A failed replica is frozen at its last good state (the failing step is discarded; a hook
failure freezes the state it judged) while the others go on, and its ``failure_step`` is recorded (a
windowed criterion dates it at the start of its first bad window).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from ..errors import JaxbenchError
from .protocol import KB_EV_PER_K

# failure_reason bit mask
FAILURE_REASONS = {1: "non-finite", 2: "temperature", 4: "bond", 8: "structural criterion (hook)",
                   16: "volume (NPT cell compressed beyond the protocol's max_compression)"}
VOLUME_BIT = 16
T_MIN, T_MAX, BOND_STRETCH = 0.1, 1e5, 0.5
PADDING_REPLICA = 1 << 30  # failure bit of the frozen copies that pad a replica batch over devices (never returned)


class FailureHook(NamedTuple):
    """A per-replica failure criterion with memory, jax-md style ``(init, update)`` pair.

    ``init(state) -> memory`` on the start state; ``update(memory, state) -> (memory, failed, onset)``
    after every saved frame, where ``failed`` is a bool scalar and ``onset`` (int, may be traced) the
    number of saved frames before this one at which the failure is dated: 0 for an instantaneous
    criterion, ``window - 1`` for a windowed one whose failure time is the start of its first bad
    window. ``memory`` is any pytree of arrays; it lives in the scan carry (one per replica), so keep it
    small (a ring buffer of per-frame histograms is fine)."""

    init: Callable
    update: Callable


def as_hook(failure) -> FailureHook | None:
    """A :class:`FailureHook` from a hook, a ``state -> bool`` callable (no memory) or None."""
    if failure is None or isinstance(failure, FailureHook):
        return failure
    if not callable(failure):
        raise JaxbenchError(f"failure_fn must be a callable state -> bool or a FailureHook, got {type(failure).__name__}")
    import jax.numpy as jnp

    return FailureHook(init=lambda state: jnp.zeros((), jnp.int32),
                       update=lambda mem, state: (mem, failure(state), 0))


def describe_failure(reason: int) -> str:
    return "+".join(v for k, v in FAILURE_REASONS.items() if int(reason) & k) or "none"


def failure_mask(state, bonds):
    """Failure bit mask (int32) of one replica's state under the built-in criteria."""
    import jax.numpy as jnp

    finite = (
        jnp.all(jnp.isfinite(state.position)) & jnp.all(jnp.isfinite(state.momentum)) & jnp.all(jnp.isfinite(state.force))
    )
    ke = 0.5 * jnp.sum(state.momentum**2 / state.mass)
    temp = 2.0 * ke / (3 * state.position.shape[0] * KB_EV_PER_K)
    bad_t = ~((temp >= T_MIN) & (temp <= T_MAX))
    bi, bj, d0, bm = bonds
    d = jnp.linalg.norm(state.position[bj] - state.position[bi], axis=-1)
    bad_b = jnp.any(bm & ~(d - d0 <= BOND_STRETCH))
    return (
        jnp.where(finite, 0, 1) | jnp.where(bad_t & finite, 2, 0) | jnp.where(bad_b & finite, 4, 0)
    ).astype(jnp.int32)


def apply_hook(c, update, save_every: int):
    """The saved-frame criterion on carry ``c`` (one replica, or a batch with a vmapped ``update``)."""
    import jax.numpy as jnp

    state, nbrs, reason, fstep, k, mem, *rest = c
    new_mem, failed, onset = update(mem, state)
    hit = jnp.asarray(failed, bool) & (reason == 0)
    fstep = jnp.where(hit, k - jnp.asarray(onset, jnp.int32) * int(save_every), fstep)
    reason = reason | jnp.where(hit, 8, 0).astype(jnp.int32)
    return (state, nbrs, reason, fstep, k, new_mem, *rest)
