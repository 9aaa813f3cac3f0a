"""Compiled XLA programs held by this process, and the kernel limit they run into.

XLA:CPU maps each compiled program's code into memory as many small mappings: a few hundred for an MD
chunk with a model inside, thousands for a training step. Linux caps the mappings of a process at
`vm.max_map_count` (65530 by default), and past it the next compilation fails inside LLVM with a
segmentation fault or an abort, not a Python error. A long session (a notebook running many simulations
of different systems, a test worker running hundreds of tests) gets there through the caches that keep
compiled programs alive on purpose: jaxbench's own (repeated simulations and training runs reuse their
jitted functions) and JAX's. Those caches are therefore bounded here in mappings, not only in entries:
`check()` clears them all once the process holds more than a fraction of the limit, and the functions
recompile on their next call. `md.simulate`, `train` and `evaluate` call it before they compile.
"""

from __future__ import annotations

import gc
import warnings
from typing import Callable

_CLEARERS: list[Callable[[], None]] = []
_warned = False


def register(clear: Callable[[], None]) -> Callable[[], None]:
    """Register a function that empties one of the project's caches of compiled functions."""
    _CLEARERS.append(clear)
    return clear


def map_count() -> int | None:
    """Memory mappings of this process (None where /proc is not available)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def map_limit() -> int | None:
    """The kernel's cap on mappings per process, `vm.max_map_count` (None where unknown)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def clear() -> None:
    """Drop every cached compiled function: the project's caches and JAX's (they recompile when called)."""
    import jax

    for c in _CLEARERS:
        c()
    jax.clear_caches()
    gc.collect()


def check(fraction: float = 0.5, warn: bool = True) -> bool:
    """Clear the caches of compiled functions if this process holds more than `fraction` of the kernel's
    mapping limit; returns whether it did (the first time with a RuntimeWarning, unless `warn` is False).
    Cheap (one read of /proc/self/maps); a no-op off Linux."""
    global _warned
    n, limit = map_count(), map_limit()
    if n is None or limit is None or n < fraction * limit:
        return False
    clear()
    if warn and not _warned:
        _warned = True
        warnings.warn(
            f"jaxbench: compiled programs held {n} memory mappings of the kernel's limit of {limit} "
            f"(vm.max_map_count); cleared the compilation caches, functions recompile when next called. "
            f"Raising the limit (sysctl vm.max_map_count=262144) avoids the recompilation.",
            RuntimeWarning,
            stacklevel=3,
        )
    return True
