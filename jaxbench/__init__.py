"""jaxbench: benchmark machine-learning force fields the way they are used, in molecular dynamics."""

__version__ = "0.1.0"


def use_cpu_devices(n: int | None = None) -> int:
    """Present the host CPU to JAX as `n` devices (default: the cores this process may run on), so that
    `jaxbench.md.simulate` runs its replicas one share per core: one XLA CPU program keeps about 1.5 of
    2 cores busy, one per core keeps all of them (BENCHMARKS.md, "Replica batching").

    Takes effect only before JAX creates its first array (the CLI and the benchmarks call it first
    thing; in a notebook call it before anything else touches JAX). Returns the number of CPU devices
    in effect. Single-device work (training, one replica) runs on the first device as before.
    """
    import os

    import jax
    from jax._src import xla_bridge

    want = n if n is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", max(1, int(want or 1)))
    try:
        return len(jax.devices("cpu"))
    except RuntimeError:
        return 0
