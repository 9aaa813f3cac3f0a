"""jaxbench: benchmark machine-learning force fields the way they are used, in molecular dynamics."""

__version__ = "0.1.0"


def use_cpu_devices(n: int | None = None) -> int:
    """One XLA device per CPU core (see `jaxbench.devices.use_cpu_devices`); call before JAX starts."""
    from .devices import use_cpu_devices as _use

    return _use(n)
