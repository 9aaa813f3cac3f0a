"""PaiNN (Schütt, Unke, Gastegger 2021, ICML, "Equivariant message passing for the prediction of tensorial
properties and molecular spectra") in Flax.

A block-by-block port of schnetpack 2.1's `representation.PaiNN` + `atomistic.Atomwise` energy head. Atoms
carry scalar features q [N, F] and vector features mu [N, 3, F] (l = 1, Cartesian components: no spherical
harmonics are needed, vectors enter only through unit edge directions and mu). Every parameter has
schnetpack's shape (Dense kernels stored [in, out], as Flax does).

    schnetpack 2.1                               here
    -----------------------------------------    ---------------------------------------------------
    nn.Embedding(100, F) on atomic numbers       `embedding` [num_species, F] on species indices
    BesselRBF: sin(n pi r / rc) / r, fixed n      `bessel_rbf`
    CosineCutoff                                  `schnet.cosine_cutoff` (x edge_mask)
    filter_net Dense(n_rbf, n_int * 3F) x fcut   `filter_net`, split per interaction (3F columns each)
      (shared_filters: Dense(n_rbf, 3F))
    PaiNNInteraction (message):                   `PaiNNInteraction`:
      phi = Dense(F, act), Dense(F, 3F) on q        `interatomic_context_net_0/1`
      (dq, dmuR, dmumu) = W_ij * phi(q)_j           same split order
      dq_i = sum_j dq; dmu_i = sum_j dmuR r^_ij     segment_sum over receivers (no 1/avg_num_neighbors:
        + dmumu mu_j                                  schnetpack sums plainly)
    PaiNNMixing (update):                         `PaiNNMixing`:
      (V, W) = mu @ U (no bias, 2F)                 `mu_channel_mix`
      ctx = [q, sqrt(|V|^2 + eps)]                  same eps (1e-8): finite gradient at mu = 0
      (a_vv, a_sv, a_ss) = Dense(F, act),            `intraatomic_context_net_0/1`
        Dense(F, 3F) on ctx
      q += a_vv + a_sv <V, W>; mu += a_ss W         same (schnetpack's names: dq_intra, dqmu_intra, dmu_intra)
    Atomwise(n_in=F): F -> F//2 -> 1, silu       `schnet.pyramidal_readout` (`readout_0`, `readout_1`)
    aggregation sum, scale/shift/E0s             in `jaxbench.potential.Potential`, not here

Messages flow sender j -> receiver i with `vectors` = r_j - r_i = schnetpack's r_ij = R[idx_j] - R[idx_i],
so r^_ij points from the receiving atom to its neighbour, as in schnetpack. Energies are invariant under
rotations and reflections (q only ever sees |V| and <V, W>).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import register
from .blocks import safe_norm
from .schnet import cosine_cutoff, get_activation, dense, pyramidal_readout


def bessel_rbf(r: jax.Array, r_max: float, num_rbf: int) -> jax.Array:
    """schnetpack BesselRBF: sin(n pi r / r_max) / r, n = 1..num_rbf (fixed frequencies, no prefactor;
    r = 0 maps to sin(0)/1 = 0 as in schnetpack)."""
    freqs = jnp.asarray(np.arange(1, num_rbf + 1) * np.pi / r_max, r.dtype)
    r_safe = jnp.where(r == 0, 1.0, r)
    return jnp.sin(r[:, None] * freqs) / r_safe[:, None]


class PaiNNInteraction(nn.Module):
    """Equivariant message: scalar and vector updates from the neighbours' scalar context."""

    num_features: int
    activation: str = "silu"

    @nn.compact
    def __call__(self, q, mu, filters, directions, senders, receivers):
        n_node, f = q.shape[0], self.num_features
        act = get_activation(self.activation, "painn.activation")
        x = act(dense(f, "interatomic_context_net_0")(q))
        x = dense(3 * f, "interatomic_context_net_1")(x)
        x = filters * x[senders]  # [E, 3F]
        dq, dmu_r, dmu_mu = x[:, :f], x[:, f : 2 * f], x[:, 2 * f :]
        dq = jax.ops.segment_sum(dq, receivers, num_segments=n_node)
        dmu = dmu_r[:, None, :] * directions[:, :, None] + dmu_mu[:, None, :] * mu[senders]  # [E, 3, F]
        dmu = jax.ops.segment_sum(dmu, receivers, num_segments=n_node)
        return q + dq, mu + dmu


class PaiNNMixing(nn.Module):
    """Equivariant update: atom-wise mixing of scalar and vector channels."""

    num_features: int
    activation: str = "silu"
    epsilon: float = 1e-8

    @nn.compact
    def __call__(self, q, mu):
        f = self.num_features
        act = get_activation(self.activation, "painn.activation")
        mu_mix = dense(2 * f, "mu_channel_mix", use_bias=False)(mu)  # acts on the channel axis: equivariant
        mu_v, mu_w = mu_mix[..., :f], mu_mix[..., f:]
        # eps inside the root (schnetpack's choice): |V| is differentiable at V = 0 (isolated atoms)
        mu_v_norm = jnp.sqrt(jnp.sum(mu_v**2, axis=-2) + self.epsilon)
        ctx = jnp.concatenate([q, mu_v_norm], axis=-1)
        x = act(dense(f, "intraatomic_context_net_0")(ctx))
        x = dense(3 * f, "intraatomic_context_net_1")(x)
        dq_intra, dmu_intra, dqmu_intra = x[:, :f], x[:, f : 2 * f], x[:, 2 * f :]
        q = q + dq_intra + dqmu_intra * jnp.sum(mu_v * mu_w, axis=-2)
        mu = mu + dmu_intra[:, None, :] * mu_w
        return q, mu


class PaiNN(nn.Module):
    num_species: int
    r_max: float
    n_atom_basis: int = 128
    n_interactions: int = 3
    n_rbf: int = 20
    activation: str = "silu"
    shared_interactions: bool = False
    shared_filters: bool = False
    epsilon: float = 1e-8
    readout_n_layers: int = 2
    readout_activation: str = "silu"

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, edge_mask, node_mask):
        dtype = vectors.dtype
        f, n_node = self.n_atom_basis, species.shape[0]
        r = safe_norm(vectors)
        # Padded edges have length 2 r_max (never 0); the where keeps r = 0 finite anyway.
        directions = vectors / jnp.where(r > 0, r, 1.0)[:, None]
        phi = bessel_rbf(r, self.r_max, self.n_rbf)
        cutoff = jnp.where(edge_mask, cosine_cutoff(r, self.r_max), 0.0).astype(dtype)
        n_filter_sets = 1 if self.shared_filters else self.n_interactions
        filters = dense(n_filter_sets * 3 * f, "filter_net")(phi) * cutoff[:, None]  # [E, n_sets * 3F]

        table = self.param("embedding", nn.initializers.normal(1.0), (self.num_species, f), jnp.float32)
        q = table.astype(dtype)[species]
        mu = jnp.zeros((n_node, 3, f), dtype)

        for t in range(self.n_interactions):
            k = 0 if self.shared_interactions else t
            s = 0 if self.shared_filters else t
            # Shared weights in Flax = calling the same submodule instance again: create it once.
            if t == 0 or not self.shared_interactions:
                interaction = PaiNNInteraction(f, self.activation, name=f"interactions_{k}")
                mixing = PaiNNMixing(f, self.activation, self.epsilon, name=f"mixing_{k}")
            q, mu = interaction(q, mu, filters[:, s * 3 * f : (s + 1) * 3 * f], directions, senders, receivers)
            q, mu = mixing(q, mu)

        act = get_activation(self.readout_activation, "painn.readout_activation")
        e = pyramidal_readout(q, self.readout_n_layers, act)[:, 0]
        return jnp.where(node_mask, e, 0.0)


_KEYS = {"r_max", "n_atom_basis", "n_interactions", "n_rbf", "activation", "shared_interactions", "shared_filters",
         "epsilon", "readout_n_layers", "readout_activation", "radial_basis", "cutoff_fn"}


@register("painn")
def build_painn(num_species: int, avg_num_neighbors: float, **hp) -> nn.Module:
    # avg_num_neighbors is unused: schnetpack's PaiNN sums neighbour messages without normalisation.
    unknown = sorted(set(hp) - _KEYS)
    if unknown:
        raise ValueError(f"painn: unknown hyperparameters {unknown}; known: {sorted(_KEYS)}")
    if "r_max" not in hp:
        raise ValueError("painn: the card's hyperparameters lack r_max (the cutoff radius, Å)")
    hp = dict(hp)
    if hp.pop("radial_basis", "bessel") != "bessel":
        raise ValueError("painn: hyperparameter radial_basis: only 'bessel' (schnetpack BesselRBF) is implemented")
    if hp.pop("cutoff_fn", "cosine") != "cosine":
        raise ValueError("painn: hyperparameter cutoff_fn: only 'cosine' (schnetpack CosineCutoff) is implemented")
    for key in ("activation", "readout_activation"):
        if key in hp:
            get_activation(hp[key], f"painn.{key}")
    hp["r_max"] = float(hp["r_max"])
    return PaiNN(num_species=num_species, **hp)
