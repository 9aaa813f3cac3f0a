"""Model zoo: one file per architecture, one card per model in the top-level `models/` directory.

An architecture is a Flax module with the call signature

    module(vectors, species, senders, receivers, edge_mask, node_mask) -> [n_node] per-atom energies

where `vectors` [n_edge, 3] are edge vectors D = r_j - r_i + S @ cell (from `jaxbench.graph.edge_vectors`),
`species` [n_node] are indices into the model's species list (0..S-1; padding nodes carry 0),
`senders` / `receivers` [n_edge] index nodes (messages flow sender -> receiver), and the masks say which
edges / nodes are real. The output is the model's raw per-atom energy in normalised units;
`jaxbench.potential.Potential` scales, shifts and adds per-species reference energies, and derives
forces and stress by differentiation. Modules must not read anything else.

Each architecture file registers a builder `(num_species, avg_num_neighbors, **hyperparameters) -> nn.Module`
with `@register(name)`.
"""

from __future__ import annotations

import importlib
from typing import Callable

import flax.linen as nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
# Architecture name -> module that registers it (imported lazily so `import jaxbench` stays light).
_MODULES = {
    "nequip": "jaxbench.models.nequip",
    "allegro": "jaxbench.models.allegro",
    "mace": "jaxbench.models.mace",
    "botnet": "jaxbench.models.mace",
    "painn": "jaxbench.models.painn",
    "schnet": "jaxbench.models.schnet",
    "torchmdnet": "jaxbench.models.torchmdnet",
    "dimenetpp": "jaxbench.models.dimenetpp",
    "equiformer": "jaxbench.models.equiformer",
}


def register(name: str):
    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def architectures() -> list[str]:
    return sorted(_MODULES)


def build_module(architecture: str, num_species: int, avg_num_neighbors: float, hyperparameters: dict) -> nn.Module:
    """The Flax module of `architecture` with the card's hyperparameters.

    Builders receive `num_species`, `avg_num_neighbors` (from the training statistics, used to
    normalise neighbour sums) and every key of the card's `hyperparameters`."""
    from ..errors import UnknownNameError

    if architecture not in _MODULES:
        raise UnknownNameError("architecture", architecture, _MODULES)
    if architecture not in _BUILDERS:
        importlib.import_module(_MODULES[architecture])
    return _BUILDERS[architecture](num_species=num_species, avg_num_neighbors=avg_num_neighbors, **hyperparameters)
