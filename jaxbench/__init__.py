"""jaxbench: benchmark machine-learning force fields the way they are used, in molecular dynamics."""

__version__ = "0.1.0"

from .devices import use_cpu_devices  # noqa: E402  (imports nothing heavy: JAX only when called)

__all__ = ["use_cpu_devices"]
