"""jaxbench: benchmark machine-learning force fields the way they are used, in molecular dynamics."""

__version__ = "0.1.0"
