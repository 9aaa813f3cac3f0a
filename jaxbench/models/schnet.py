"""SchNet (Schütt et al. 2017, NeurIPS; 2018, J. Chem. Phys. 148, 241722) in Flax.

A block-by-block port of schnetpack 2.1's `representation.SchNet` + `atomistic.Atomwise` energy head:
continuous-filter convolutions whose filters are generated from a Gaussian expansion of the distance,
damped by a Behler cosine cutoff, with shifted-softplus activations. Every parameter has schnetpack's
shape (Dense kernels are stored transposed, [in, out], as Flax does).

    schnetpack 2.1                               here
    -----------------------------------------    ---------------------------------------------------
    nn.Embedding(100, F) on atomic numbers       `embedding` [num_species, F] on species indices
    GaussianRBF(n_rbf, cutoff): centres           `gaussian_rbf`
      linspace(0, rc, n), width = spacing
    CosineCutoff: 0.5 (cos(pi r / rc) + 1),       `cosine_cutoff` (x edge_mask: padded edges carry nothing)
      0 for r >= rc
    SchNetInteraction:                            `SchNetInteraction`:
      in2f  Dense(F, n_filters, no bias)            `in2f`
      filter_network Dense(n_rbf, nf, ssp),         `filter_network_0`, `filter_network_1`
        Dense(nf, nf)  x rcut_ij
      x_j * W_ij, scatter_add(idx_i)                x[senders] * W, segment_sum(receivers) (no
                                                      1/avg_num_neighbors: schnetpack sums plainly)
      f2out Dense(nf, F, ssp), Dense(F, F)          `f2out_0`, `f2out_1`
    x = x + interaction(x)  (n_interactions)      same residual update
    Atomwise(n_in=F): build_mlp pyramidal          `readout_0..`: F -> F/2 -> ... -> 1, activation
      F -> F//2 -> 1, silu between layers            `readout_activation` (schnetpack 2: silu; the
                                                      original SchNet and OCP's: shifted softplus)
    aggregation sum, scale/shift/E0s              in `jaxbench.potential.Potential`, not here

Edges are directed (both directions present): messages flow sender j -> receiver i with
`vectors` = r_j - r_i, schnetpack's r_ij = R[idx_j] - R[idx_i].
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import register
from .blocks import safe_norm


def shifted_softplus(x: jax.Array) -> jax.Array:
    """ln(1 + e^x) - ln 2: zero at x = 0, so that an untrained network starts near zero output."""
    return jax.nn.softplus(x) - math.log(2.0)


ACTIVATIONS = {"ssp": shifted_softplus, "shifted_softplus": shifted_softplus, "silu": jax.nn.silu,
               "tanh": jnp.tanh}


def get_activation(name: str, where: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def cosine_cutoff(r: jax.Array, r_max: float) -> jax.Array:
    """Behler cosine cutoff 0.5 (cos(pi r / r_max) + 1) for r < r_max, 0 beyond: value and first
    derivative vanish at r_max (the second does not, so forces are continuous, their derivatives jump)."""
    return jnp.where(r < r_max, 0.5 * (jnp.cos(r * (np.pi / r_max)) + 1.0), 0.0)


def gaussian_rbf(r: jax.Array, r_max: float, num_rbf: int, start: float = 0.0) -> jax.Array:
    """schnetpack GaussianRBF: exp(-(r - mu_k)^2 / (2 w^2)), mu_k = linspace(start, r_max, n), w = the
    spacing of the centres (fixed, not trainable: schnetpack's default)."""
    if num_rbf < 2:
        raise ValueError(f"schnet: n_rbf must be >= 2 (the Gaussian width is the centre spacing), got {num_rbf}")
    offsets = np.linspace(start, r_max, num_rbf)
    width = abs(offsets[1] - offsets[0])
    return jnp.exp((-0.5 / width**2) * (r[:, None] - jnp.asarray(offsets, r.dtype)) ** 2)


def dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
    """schnetpack `Dense`: Xavier-uniform weights, zero bias. Parameters float32; the matmul runs in the
    input's dtype (Flax promotes float32 parameters to float64 inputs)."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.zeros, param_dtype=jnp.float32, name=name)


def pyramidal_readout(x: jax.Array, n_layers: int, act, n_out: int = 1, prefix: str = "readout") -> jax.Array:
    """schnetpack `build_mlp(n_in, n_out, n_hidden=None, n_layers)`: widths halve each layer
    (n_in, max(n_out, n_in // 2), ...), activation after every layer but the last.
    Must be called inside a compact module (creates Dense submodules there)."""
    widths, c = [], x.shape[-1]
    for _ in range(n_layers):
        widths.append(c)
        c = max(n_out, c // 2)
    widths.append(n_out)
    for i in range(n_layers):
        x = dense(widths[i + 1], f"{prefix}_{i}")(x)
        if i < n_layers - 1:
            x = act(x)
    return x


class SchNetInteraction(nn.Module):
    num_features: int
    num_filters: int
    activation: str = "ssp"

    @nn.compact
    def __call__(self, x, rbf, cutoff, senders, receivers):
        act = get_activation(self.activation, "schnet.activation")
        x = dense(self.num_filters, "in2f", use_bias=False)(x)
        w = act(dense(self.num_filters, "filter_network_0")(rbf))
        w = dense(self.num_filters, "filter_network_1")(w) * cutoff[:, None]
        # continuous-filter convolution: x_i' = sum_j x_j * W(r_ij)
        x = jax.ops.segment_sum(x[senders] * w, receivers, num_segments=x.shape[0])
        x = act(dense(self.num_features, "f2out_0")(x))
        return dense(self.num_features, "f2out_1")(x)


class SchNet(nn.Module):
    num_species: int
    r_max: float
    n_atom_basis: int = 128
    n_interactions: int = 6
    n_filters: int | None = None  # schnetpack: None -> n_atom_basis
    n_rbf: int = 20
    activation: str = "ssp"
    shared_interactions: bool = False
    readout_n_layers: int = 2
    readout_activation: str = "silu"

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, edge_mask, node_mask):
        dtype = vectors.dtype
        r = safe_norm(vectors)
        rbf = gaussian_rbf(r, self.r_max, self.n_rbf).astype(dtype)
        # Padded edges sit at 2 r_max (cutoff 0 already); the mask makes that independent of the padding.
        cutoff = jnp.where(edge_mask, cosine_cutoff(r, self.r_max), 0.0).astype(dtype)

        # torch nn.Embedding initialisation: N(0, 1)
        table = self.param("embedding", nn.initializers.normal(1.0), (self.num_species, self.n_atom_basis), jnp.float32)
        x = table.astype(dtype)[species]

        n_filters = self.n_filters or self.n_atom_basis
        blocks = [SchNetInteraction(self.n_atom_basis, n_filters, self.activation, name="interactions_0")]
        for t in range(1, self.n_interactions):
            blocks.append(blocks[0] if self.shared_interactions else
                          SchNetInteraction(self.n_atom_basis, n_filters, self.activation, name=f"interactions_{t}"))
        for block in blocks:
            x = x + block(x, rbf, cutoff, senders, receivers)

        act = get_activation(self.readout_activation, "schnet.readout_activation")
        e = pyramidal_readout(x, self.readout_n_layers, act)[:, 0]
        return jnp.where(node_mask, e, 0.0)


_KEYS = {"r_max", "n_atom_basis", "n_interactions", "n_filters", "n_rbf", "activation", "shared_interactions",
         "readout_n_layers", "readout_activation", "radial_basis", "cutoff_fn"}


@register("schnet")
def build_schnet(num_species: int, avg_num_neighbors: float, **hp) -> nn.Module:
    # avg_num_neighbors is unused: schnetpack's SchNet sums neighbour messages without normalisation.
    unknown = sorted(set(hp) - _KEYS)
    if unknown:
        raise ValueError(f"schnet: unknown hyperparameters {unknown}; known: {sorted(_KEYS)}")
    if "r_max" not in hp:
        raise ValueError("schnet: the card's hyperparameters lack r_max (the cutoff radius, Å)")
    hp = dict(hp)
    # Only schnetpack's default radial basis and cutoff are implemented; the card names them explicitly.
    if hp.pop("radial_basis", "gaussian") != "gaussian":
        raise ValueError("schnet: hyperparameter radial_basis: only 'gaussian' (schnetpack GaussianRBF) is implemented")
    if hp.pop("cutoff_fn", "cosine") != "cosine":
        raise ValueError("schnet: hyperparameter cutoff_fn: only 'cosine' (schnetpack CosineCutoff) is implemented")
    for key in ("activation", "readout_activation"):
        if key in hp:
            get_activation(hp[key], f"schnet.{key}")
    hp["r_max"] = float(hp["r_max"])
    return SchNet(num_species=num_species, **hp)
