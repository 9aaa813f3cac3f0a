"""Devices: the CPU as one XLA device per core, and the checks and meshes that split work over devices.

One XLA CPU program keeps only ~1.5 of 2 cores busy (a model call is hundreds of small ops, most on one
thread); one program per core keeps all of them. `md.simulate` splits replicas and `train` splits
batches over the local devices (BENCHMARKS.md, "Replica batching").
"""

from __future__ import annotations

import os


def use_cpu_devices(n: int | None = None) -> int:
    """Present the host CPU to JAX as `n` devices (default: the cores this process may run on).

    Takes effect only before JAX creates its first array (the CLI and the benchmarks call it first
    thing; in a notebook call it before anything else touches JAX). Returns the number of CPU devices
    in effect. Single-device work (one replica, a batch of one) runs on the first device as before.
    """
    import jax
    from jax._src import xla_bridge

    want = n if n is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", max(1, int(want or 1)))
    try:
        return len(jax.devices("cpu"))
    except RuntimeError:
        return 0


def count(devices, at_most: int, error=ValueError) -> int:
    """The number of local devices to split `at_most` items (replicas, frames) over: `devices` checked
    against the local devices (`error` names the bad value), default all of them, never more than items."""
    import jax

    n_local = len(jax.local_devices())
    if devices is not None and not (isinstance(devices, int) and 1 <= devices <= n_local):
        raise error(f"devices must be an integer from 1 to the {n_local} local device(s), got {devices!r}")
    return max(1, min(n_local if devices is None else devices, at_most))


def mesh(n: int, axis: str):
    """A 1-D mesh over the first `n` local devices, for `jax.shard_map` over `axis`."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.asarray(jax.local_devices()[:n]), (axis,))


def inputs_on_mesh(fn, n: int, axis: str, n_args: int | None = None):
    """``fn`` (jitted, run over a mesh of `n` devices) called with its first `n_args` arguments (all by
    default) put replicated on that mesh first. A program over the mesh returns replicated outputs, and
    the first call of a loop that feeds them back (MD chunks, training steps) gets arrays on one device:
    jit keys on the inputs' sharding, so without this the loop's program compiles twice."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    on_mesh = NamedSharding(mesh(n, axis), PartitionSpec())
    k = n_args

    def call(*args):
        k_ = len(args) if k is None else k
        return fn(*jax.device_put(args[:k_], on_mesh), *args[k_:])

    return call
