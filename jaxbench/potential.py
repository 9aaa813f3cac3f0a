"""`Potential`: a model card + dataset statistics + Flax module -> energy, forces, stress.

    E = sum_i [ scale * e_i + shift + E0[Z_i] ],   F = -dE/dr,   sigma = (1/V) dE/d(strain)

e_i are the module's per-atom outputs (normalised units); scale is the training force RMS, shift the
mean per-atom residual energy and E0 the least-squares reference energies (`jaxbench.stats`), as in
MACE and NequIP. Forces and stress are derivatives of the one energy, so they are conservative and
consistent by construction.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import cards as _cards
from .errors import DataError
from .graph import Graph, edge_vectors
from .stats import DatasetStatistics


# ---------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------
def deep_update(base: dict, over: dict) -> dict:
    """`base` with `over` merged in, recursively for nested mappings (both left unchanged)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_model_card(card: dict, file: str, prefix: str = "") -> None:
    """Raise `DataError` naming the card file and key for an architecture or cutoff no model can be built with
    (checked when the cards are read, so a typo is reported before any data is loaded)."""
    from .models import architectures

    arch = card.get("architecture")
    if arch not in architectures():
        what = "missing" if arch is None else f"unknown architecture {arch!r}"
        raise DataError(f"{what}; known: {', '.join(architectures())}", file=file, key=f"{prefix}architecture")
    hp = card.get("hyperparameters")
    if not isinstance(hp, dict):
        raise DataError(f"must be a mapping of hyperparameters, got {hp!r}", file=file, key=f"{prefix}hyperparameters")
    r = hp.get("r_max")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r > 0):
        raise DataError(f"the cutoff must be a positive number of Å, got {r!r}", file=file,
                        key=f"{prefix}hyperparameters.r_max")


def model_cards() -> dict[str, dict[str, Any]]:
    """Every model card by name, variants expanded (`<name>-<variant>`, e.g. `mace-small`)."""
    out = {}
    for name, card in _cards.cards("models").items():
        file = card["_path"]
        variants = card.pop("variants", {}) or {}
        if not isinstance(variants, dict):
            raise DataError(f"must be a mapping of variant name -> overrides, got {variants!r}", file=file, key="variants")
        _check_model_card(card, file)
        out[name] = card
        for vname, over in variants.items():
            if not isinstance(over, dict):
                raise DataError(f"a variant must be a mapping of overrides, got {over!r}", file=file, key=f"variants.{vname}")
            v = deep_update(card, over)
            _check_model_card(v, file, prefix=f"variants.{vname}.")
            v["name"] = f"{name}-{vname}"
            v["variant_of"] = name
            out[v["name"]] = v
    return out


def model_card(name_or_card) -> dict[str, Any]:
    if isinstance(name_or_card, dict):
        return copy.deepcopy(name_or_card)
    cards = model_cards()
    return cards[_cards.lookup("models", name_or_card, cards)]


# ---------------------------------------------------------------------------------------------
# Potential
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Potential:
    card: dict[str, Any]
    statistics: DatasetStatistics
    module: nn.Module

    @staticmethod
    def from_card(card, statistics: DatasetStatistics) -> "Potential":
        from .models import build_module

        card = model_card(card)
        hp = dict(card.get("hyperparameters", {}))
        if float(hp.get("r_max", statistics.cutoff)) != float(statistics.cutoff):
            raise ValueError(
                f"model card '{card['name']}' has r_max {hp.get('r_max')} Å but the statistics were computed at "
                f"{statistics.cutoff} Å; recompute them at the model's cutoff"
            )
        module = build_module(card["architecture"], len(statistics.species), statistics.avg_num_neighbors, hp)
        return Potential(card=card, statistics=statistics, module=module)

    # -- species -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def r_max(self) -> float:
        return float(self.card["hyperparameters"]["r_max"])

    @property
    def species(self) -> tuple[int, ...]:
        return tuple(self.statistics.species)

    @property
    def _species_table(self) -> np.ndarray:
        table = np.full(119, -1, np.int32)
        table[list(self.species)] = np.arange(len(self.species), dtype=np.int32)
        return table

    def check_species(self, numbers, where: str = "") -> None:
        """Raise `DataError` (before any compute) if `numbers` hold species the model cannot represent."""
        from ase.data import chemical_symbols

        numbers = np.asarray(numbers)
        numbers = numbers[numbers > 0]
        unknown = sorted(set(np.unique(numbers).tolist()) - set(self.species))
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            known = ", ".join(chemical_symbols[z] for z in self.species)
            raise DataError(f"model '{self.name}' was built for {known}; it cannot represent {names}" + (f" ({where})" if where else ""))

    def species_index(self, numbers: jax.Array) -> jax.Array:
        """Atomic numbers -> model species indices (padding Z=0 -> 0; validate with `check_species`)."""
        idx = jnp.asarray(self._species_table)[numbers]
        return jnp.where(idx >= 0, idx, 0)

    # -- parameters ----------------------------------------------------------------------------
    def init(self, key: jax.Array, graph: Graph, dtype=jnp.float32):
        vectors = edge_vectors(graph, positions=jnp.asarray(graph.positions, dtype), pad_length=2 * self.r_max)
        params = jax.jit(self.module.init)(
            key, vectors, self.species_index(graph.species), graph.senders, graph.receivers,
            graph.edge_mask, graph.node_mask,
        )
        return cast_params(params, dtype)

    def num_parameters(self, params) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

    # -- energy, forces, stress ----------------------------------------------------------------
    def node_energies(self, params, graph: Graph, positions=None, strain=None) -> jax.Array:
        """[n_node] per-atom energies in eV (0 on padding nodes)."""
        vectors = edge_vectors(graph, positions=positions, strain=strain, pad_length=2 * self.r_max)
        dtype = jax.tree.leaves(params)[0].dtype
        out = self.module.apply(
            params, vectors.astype(dtype), self.species_index(graph.species), graph.senders, graph.receivers,
            graph.edge_mask, graph.node_mask,
        )
        # The network runs in the parameters' dtype; scale, shift and E0s are added in the positions'
        # dtype. With float32 weights in float64 MD, totals (E0s: thousands of eV, float32 ulp ~ 0.01 eV)
        # keep float64 resolution while per-atom network outputs keep float32's relative 1e-7.
        out = out.astype(jnp.promote_types(vectors.dtype, out.dtype))
        st = self.statistics
        e0 = jnp.asarray([st.atomic_energies[z] for z in self.species], dtype=out.dtype)
        energies = st.force_rms * out + st.energy_per_atom_mean + e0[self.species_index(graph.species)]
        return jnp.where(graph.node_mask, energies, 0.0)

    def energy(self, params, graph: Graph, positions=None, strain=None) -> jax.Array:
        """[n_graph] total energies in eV (0 on the padding graph)."""
        e = self.node_energies(params, graph, positions=positions, strain=strain)
        return jax.ops.segment_sum(e, graph.node_graph, num_segments=graph.num_graphs) * graph.graph_mask

    def __call__(self, params, graph: Graph, compute_stress: bool = False) -> dict[str, jax.Array]:
        """{'energy' [n_graph] eV, 'forces' [n_node, 3] eV/Å, 'stress' [n_graph, 3, 3] eV/Å³ (if asked)}."""
        positions = graph.positions.astype(jax.tree.leaves(params)[0].dtype)
        strain = jnp.zeros((graph.num_graphs, 3, 3), positions.dtype)

        def total(positions, strain):
            e = self.energy(params, graph, positions=positions, strain=strain)
            return jnp.sum(e), e

        argnums = (0, 1) if compute_stress else 0
        grads, energy = jax.grad(total, argnums=argnums, has_aux=True)(positions, strain)
        out = {"energy": energy}
        if compute_stress:
            dpos, dstrain = grads
            periodic = jnp.any(graph.pbc, axis=-1) & graph.graph_mask
            out["stress"] = jnp.where(periodic[:, None, None], dstrain / graph.volume[:, None, None], 0.0)
        else:
            dpos = grads
        out["forces"] = jnp.where(graph.node_mask[:, None], -dpos, 0.0)
        return out


def cast_params(params, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def count_parameters(card, species=(1, 6, 8)) -> int:
    """Parameters of a card's model for `species` (shape evaluation only: nothing is computed)."""
    from .frames import Frames
    from .graph import build_graphs

    card = model_card(card)
    r_max = float(card["hyperparameters"]["r_max"])
    species = tuple(sorted(species))
    stats = DatasetStatistics(
        species=species, atomic_energies={z: 0.0 for z in species}, energy_per_atom_mean=0.0,
        energy_per_atom_std=1.0, force_rms=1.0, avg_num_neighbors=8.0, cutoff=r_max, n_frames=1,
    )
    pot = Potential.from_card(card, stats)
    n = len(species)
    positions = np.array([[1.2 * k, 0.3 * (k % 2), 0.0] for k in range(max(n, 2))])
    numbers = [species[k % n] for k in range(len(positions))]
    graph = build_graphs(Frames.from_arrays(positions[None], numbers), r_max).batch([0])
    vectors = edge_vectors(graph, pad_length=2 * r_max)
    shapes = jax.eval_shape(
        pot.module.init, jax.random.PRNGKey(0), vectors, pot.species_index(graph.species), graph.senders,
        graph.receivers, graph.edge_mask, graph.node_mask,
    )
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
