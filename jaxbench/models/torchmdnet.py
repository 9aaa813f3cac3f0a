"""TorchMD-Net equivariant transformer (ET; Thölke & De Fabritiis 2022, ICLR, arXiv:2202.02541) in Flax.

A block-by-block port of torchmd-net's `TorchMD_ET` representation plus the `EquivariantScalar` output
model (what torchmd-net builds for `model: equivariant-transformer, output_model: Scalar`: `create_model`
prefixes "Equivariant" for equivariant representations). Parameter names and shapes follow torchmd-net
(`nn.Linear(in, out)` -> `nn.Dense(out)`, kernel = weight.T), so weights carry over one to one.

    torchmd-net (torchmdnet/models/...)           here
    -------------------------------------------   -------------------------------------------------------
    ExpNormalSmearing (utils.py): PhysNet basis    `ExpNormalSmearing`: exp(-beta_k (exp(alpha (r_lo - r))
      times CosineCutoff(0, r_max)                   - mu_k)^2) * cos-cutoff(r), alpha = 5 / (r_max - r_lo)
    CosineCutoff                                   `cosine_cutoff`
    embedding = nn.Embedding(max_z, H)             `embedding` = nn.Embed(num_species, H) (species indices,
                                                     not Z: rows for absent elements never exist)
    NeighborEmbedding (eq. 3 of the paper):        `NeighborEmbedding`: x_i <- combine([x_i, sum_j
      self-loops removed                             cos(r_ij) W(f_ij) * emb'(z_j)]) over real edges only
    OptimizedDistance(loop=True): every atom is    explicit self-loop messages: torchmd-net's neighbour list
      its own neighbour (r = 0, d = 0)               has one edge i -> i per atom (r = 0, unit vector left 0);
                                                     jaxbench graphs have none, so `TorchMDNet` appends them
    EquivariantMultiHeadAttention (x num_layers)   `EquivariantMultiHeadAttention`: layernorm; q, k, v (3H),
                                                     vec_proj (3H, no bias); distance filters dk (H), dv (3H);
                                                     attention silu(sum q_i k_j dk_ij) * cos(r_ij) per head;
                                                     messages v_j dv_ij -> (x, vec1, vec2) split; scalar
                                                     message x * attn, vector message vec_j * vec1 + vec2 d_ij;
                                                     o_proj (3H): dx = <vec1, vec2> o2 + o3,
                                                     dvec = vec3 o1 + sum_j vec messages
    residual x += dx, vec += dvec; out_norm        same; `out_norm` LayerNorm (torch eps 1e-5)
    EquivariantScalar (output_modules.py):         `GatedEquivariantBlock` x 2 (H -> H/2 with scalar
      GatedEquivariantBlock(H, H/2, scalar_act),     activation, H/2 -> 1): the per-atom energy is the
      GatedEquivariantBlock(H/2, 1)                  scalar output; the vector output is discarded
    std / mean / prior / reduce (TorchMD_Net)       in `jaxbench.potential.Potential`, not here

Conventions: torchmd-net's edge_index[0] (j, the source of k, v, vec) is our `senders`, edge_index[1]
(i, where messages are summed) our `receivers`, and its edge_vec = pos[j] - pos[i] is our `vectors`
(r_j - r_i + periodic shift), so d_ij has the same sign as in torchmd-net. Messages are plain sums
(torchmd-net does not normalise by the number of neighbours; `avg_num_neighbors` is unused).

`vector_cutoff` is torchmd-net's option (default False, as in the ET paper): without it only the
attention weight carries the cosine cutoff, and the vector message vec_j * vec1 + vec2 * d_ij of a
neighbour at r -> r_max does not vanish, so the energy jumps when an atom crosses the cutoff. With it
the values v_j are multiplied by the cutoff instead (both scalar and vector messages vanish smoothly).

Periodic self-images (an edge i -> i with a non-zero cell shift, present in small cells) are real
neighbours here; torchmd-net's PBC neighbour list requires the cutoff to be below half the box, so it
never meets them.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import register

_ACTS = {
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "ssp": lambda x: jax.nn.softplus(x) - math.log(2.0),  # torchmd-net ShiftedSoftplus
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}

# torch nn.Linear as torchmd-net initialises it (`reset_parameters`): Xavier-uniform weight, zero bias.
_xavier = nn.initializers.xavier_uniform()


def _dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, kernel_init=_xavier, name=name)


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, name=name)  # torch nn.LayerNorm default eps


def cosine_cutoff(r: jax.Array, cutoff_lower: float, cutoff_upper: float) -> jax.Array:
    """torchmd-net `CosineCutoff`: 0.5 (cos(pi r / r_max) + 1) for r < r_max (C^1 at r_max); with a lower
    cutoff, the cosine bump 0.5 (cos(pi (2 (r - r_lo) / (r_max - r_lo) + 1)) + 1) on (r_lo, r_max)."""
    if cutoff_lower > 0:
        c = 0.5 * (jnp.cos(math.pi * (2.0 * (r - cutoff_lower) / (cutoff_upper - cutoff_lower) + 1.0)) + 1.0)
        return jnp.where((r < cutoff_upper) & (r > cutoff_lower), c, 0.0)
    c = 0.5 * (jnp.cos(r * (math.pi / cutoff_upper)) + 1.0)
    return jnp.where(r < cutoff_upper, c, 0.0)


def expnorm_initial_params(cutoff_lower: float, cutoff_upper: float, num_rbf: int) -> tuple[np.ndarray, np.ndarray]:
    """PhysNet's initial means (evenly spaced in exp(-r) from exp(r_lo - r_max) to 1) and betas."""
    start = math.exp(-cutoff_upper + cutoff_lower)
    means = np.linspace(start, 1.0, num_rbf)
    betas = np.full(num_rbf, (2.0 / num_rbf * (1.0 - start)) ** -2)
    return means, betas


class ExpNormalSmearing(nn.Module):
    """torchmd-net `ExpNormalSmearing` [..., num_rbf]; means/betas are parameters if `trainable`."""

    cutoff_lower: float
    cutoff_upper: float
    num_rbf: int
    trainable: bool = False

    @nn.compact
    def __call__(self, r: jax.Array) -> jax.Array:
        means0, betas0 = expnorm_initial_params(self.cutoff_lower, self.cutoff_upper, self.num_rbf)
        if self.trainable:
            means = self.param("means", lambda key, shape: jnp.asarray(means0, jnp.float32), means0.shape)
            betas = self.param("betas", lambda key, shape: jnp.asarray(betas0, jnp.float32), betas0.shape)
        else:  # torchmd-net registers them as buffers: constants, not counted as parameters
            means, betas = means0, betas0
        means, betas = jnp.asarray(means, r.dtype), jnp.asarray(betas, r.dtype)
        alpha = 5.0 / (self.cutoff_upper - self.cutoff_lower)
        r = r[..., None]
        # The envelope is CosineCutoff(0, r_max) whatever the lower cutoff (as in torchmd-net).
        return cosine_cutoff(r, 0.0, self.cutoff_upper) * jnp.exp(
            -betas * (jnp.exp(alpha * (self.cutoff_lower - r)) - means) ** 2
        )


class NeighborEmbedding(nn.Module):
    """torchmd-net `NeighborEmbedding` (paper eq. 3): a second species embedding, summed over the real
    neighbours with a distance filter W(f_ij) cos(r_ij), then mixed with the atom's own embedding."""

    hidden_channels: int
    num_species: int
    cutoff_lower: float
    cutoff_upper: float

    @nn.compact
    def __call__(self, species, x, rbf, edge_weight, senders, receivers):
        # edge_weight: cosine cutoff times the edge mask (0 on padding / out-of-range edges)
        w = _dense(self.hidden_channels, "distance_proj")(rbf) * edge_weight[:, None]
        emb = nn.Embed(self.num_species, self.hidden_channels, embedding_init=nn.initializers.normal(1.0),
                       name="embedding")(species).astype(x.dtype)
        x_neighbors = jax.ops.segment_sum(w * emb[senders], receivers, num_segments=x.shape[0])
        return _dense(self.hidden_channels, "combine")(jnp.concatenate([x, x_neighbors], axis=-1))


class EquivariantMultiHeadAttention(nn.Module):
    """One torchmd-net ET layer; returns the residual updates (dx [N, H], dvec [N, 3, H])."""

    hidden_channels: int
    num_heads: int
    distance_influence: str = "both"  # where the distance filters enter: keys, values, both, none
    activation: str = "silu"
    attn_activation: str = "silu"
    vector_cutoff: bool = False

    @nn.compact
    def __call__(self, x, vec, rbf, cutoff, unit_vectors, senders, receivers, edge_mask):
        """rbf [E, K], cutoff [E] (cosine cutoff), unit_vectors d_ij [E, 3], edge_mask [E]: every edge
        array includes the self-loops (r = 0, cutoff 1, d = 0)."""
        h, nh = self.hidden_channels, self.num_heads
        hd = h // nh
        n_node, n_edge = x.shape[0], senders.shape[0]
        act, attn_act = _ACTS[self.activation], _ACTS[self.attn_activation]

        x = _layer_norm("layernorm")(x)
        q = _dense(h, "q_proj")(x).reshape(n_node, nh, hd)
        k = _dense(h, "k_proj")(x).reshape(n_node, nh, hd)
        v = _dense(3 * h, "v_proj")(x).reshape(n_node, nh, 3 * hd)
        vec1, vec2, vec3 = jnp.split(_dense(3 * h, "vec_proj", use_bias=False)(vec), 3, axis=-1)  # [N, 3, H] each
        vec_dot = jnp.sum(vec1 * vec2, axis=1)  # [N, H]: rotation invariant

        # -- messages j -> i (per head) --
        q_i, k_j, v_j = q[receivers], k[senders], v[senders]
        if self.distance_influence in ("keys", "both"):
            dk = act(_dense(h, "dk_proj")(rbf)).reshape(n_edge, nh, hd)
            attn = jnp.sum(q_i * k_j * dk, axis=-1)
        else:
            attn = jnp.sum(q_i * k_j, axis=-1)
        attn = attn_act(attn)  # [E, heads]
        if self.vector_cutoff:
            v_j = v_j * cutoff[:, None, None]
        else:
            attn = attn * cutoff[:, None]
        if self.distance_influence in ("values", "both"):
            v_j = v_j * act(_dense(3 * h, "dv_proj")(rbf)).reshape(n_edge, nh, 3 * hd)
        x_m, vec1_m, vec2_m = jnp.split(v_j, 3, axis=-1)  # [E, heads, hd] each
        x_m = x_m * attn[..., None]
        vec_j = vec[senders].reshape(n_edge, 3, nh, hd)
        vec_m = vec_j * vec1_m[:, None] + vec2_m[:, None] * unit_vectors[:, :, None, None]
        # Padding edges (and, without vector_cutoff, edges beyond r_max that a skin-padded neighbour
        # list may hold, which torchmd-net's list never returns) carry nothing.
        x_m = jnp.where(edge_mask[:, None, None], x_m, 0.0)
        vec_m = jnp.where(edge_mask[:, None, None, None], vec_m, 0.0)
        x_agg = jax.ops.segment_sum(x_m, receivers, num_segments=n_node).reshape(n_node, h)
        vec_agg = jax.ops.segment_sum(vec_m, receivers, num_segments=n_node).reshape(n_node, 3, h)

        o1, o2, o3 = jnp.split(_dense(3 * h, "o_proj")(x_agg), 3, axis=-1)
        dx = vec_dot * o2 + o3
        dvec = vec3 * o1[:, None, :] + vec_agg
        return dx, dvec


def _safe_norm_axis1(v: jax.Array) -> jax.Array:
    """|v| over the Cartesian axis of [N, 3, C] with a zero (not NaN) gradient where v = 0: atoms with no
    neighbour have exactly zero vector features (torchmd-net masks those atoms for the same reason)."""
    sq = jnp.sum(v**2, axis=1)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


class GatedEquivariantBlock(nn.Module):
    """Gated equivariant block (Schütt et al. 2021, PaiNN) as in torchmd-net `GatedEquivariantBlock`:
    x' , g = MLP([x, |W1 v|]); v' = g * W2 v; x' = act(x') if `scalar_activation`."""

    hidden_channels: int
    out_channels: int
    activation: str = "silu"
    scalar_activation: bool = False

    @nn.compact
    def __call__(self, x, v):
        act = _ACTS[self.activation]
        vec1 = _safe_norm_axis1(_dense(self.hidden_channels, "vec1_proj", use_bias=False)(v))
        vec2 = _dense(self.out_channels, "vec2_proj", use_bias=False)(v)
        # update_net = torchmd-net MLP(2H -> H -> 2 out), act in between
        y = _dense(self.hidden_channels, "update_net_0")(jnp.concatenate([x, vec1], axis=-1))
        y = _dense(2 * self.out_channels, "update_net_1")(act(y))
        x, gate = jnp.split(y, 2, axis=-1)
        v = gate[:, None, :] * vec2
        if self.scalar_activation:
            x = act(x)
        return x, v


class TorchMDNet(nn.Module):
    """TorchMD_ET + EquivariantScalar -> [n_node] per-atom energies. Field defaults are those of
    torchmd-net's `TorchMD_ET` class (its `torchmd-train` script defaults differ: num_rbf 64,
    trainable_rbf False, neighbor_embedding False); the cards set every value."""

    num_species: int
    r_max: float  # torchmd-net cutoff_upper
    cutoff_lower: float = 0.0
    embedding_dimension: int = 128  # hidden_channels
    num_layers: int = 6
    num_rbf: int = 50
    trainable_rbf: bool = True
    activation: str = "silu"
    attn_activation: str = "silu"
    neighbor_embedding: bool = True
    num_heads: int = 8
    distance_influence: str = "both"
    vector_cutoff: bool = False

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, edge_mask, node_mask):
        dtype = vectors.dtype
        n_node = species.shape[0]
        h = self.embedding_dimension

        # -- edges: torchmd-net's neighbour list holds only cutoff_lower <= r < cutoff_upper --
        sq = jnp.sum(vectors**2, axis=-1)
        r = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))  # a zero-length (padding) vector: no NaN gradient through sqrt
        in_range = edge_mask & (sq > 0) & (r < self.r_max) & (r >= self.cutoff_lower)
        unit_vectors = jnp.where(in_range[:, None], vectors / r[:, None], 0.0)
        rbf_module = ExpNormalSmearing(self.cutoff_lower, self.r_max, self.num_rbf, self.trainable_rbf,
                                       name="distance_expansion")
        rbf = rbf_module(r)
        cutoff = jnp.where(in_range, cosine_cutoff(r, self.cutoff_lower, self.r_max), 0.0)

        x = nn.Embed(self.num_species, h, embedding_init=nn.initializers.normal(1.0), name="embedding")(species)
        x = x.astype(dtype)
        if self.neighbor_embedding:
            x = NeighborEmbedding(h, self.num_species, self.cutoff_lower, self.r_max, name="neighbor_embedding")(
                species, x, rbf, cutoff, senders, receivers
            )

        # -- self-loops (torchmd-net's loop=True): r = 0, so rbf(0), and the attention cutoff is taken
        #    at r = 0 (= 1 for cutoff_lower = 0: CosineCutoff with a lower cutoff zeroes r <= r_lo); d = 0 --
        nodes = jnp.arange(n_node, dtype=senders.dtype)
        zero = jnp.zeros((n_node,), dtype)
        all_senders = jnp.concatenate([senders, nodes])
        all_receivers = jnp.concatenate([receivers, nodes])
        all_rbf = jnp.concatenate([rbf, rbf_module(zero)], axis=0)
        all_cutoff = jnp.concatenate([cutoff, cosine_cutoff(zero, self.cutoff_lower, self.r_max)])
        all_unit = jnp.concatenate([unit_vectors, jnp.zeros((n_node, 3), dtype)], axis=0)
        all_mask = jnp.concatenate([in_range, node_mask])

        vec = jnp.zeros((n_node, 3, h), dtype)
        for i in range(self.num_layers):
            dx, dvec = EquivariantMultiHeadAttention(
                h, self.num_heads, self.distance_influence, self.activation, self.attn_activation,
                self.vector_cutoff, name=f"attention_layers_{i}",
            )(x, vec, all_rbf, all_cutoff, all_unit, all_senders, all_receivers, all_mask)
            x = x + dx
            vec = vec + dvec
        x = _layer_norm("out_norm")(x)

        # -- EquivariantScalar output --
        x, vec = GatedEquivariantBlock(h, h // 2, self.activation, scalar_activation=True,
                                       name="output_network_0")(x, vec)
        x, _ = GatedEquivariantBlock(h // 2, 1, self.activation, name="output_network_1")(x, vec)
        return jnp.where(node_mask, x[:, 0], 0.0)


@register("torchmdnet")
def build_torchmdnet(num_species: int, avg_num_neighbors: float, **hp) -> nn.Module:
    """Card keys are torchmd-net's (`embedding_dimension`, `num_rbf`, ...); `r_max` is `cutoff_upper`."""
    del avg_num_neighbors  # torchmd-net sums messages without normalisation
    hp = dict(hp)
    where = "torchmdnet card hyperparameters"
    model = hp.pop("model", "equivariant-transformer")
    if model != "equivariant-transformer":
        raise ValueError(f"{where}: model {model!r}: only torchmd-net's 'equivariant-transformer' is implemented")
    output_model = hp.pop("output_model", "Scalar")
    if output_model != "Scalar":
        raise ValueError(f"{where}: output_model {output_model!r}: only 'Scalar' (EquivariantScalar for the ET) "
                         "is implemented")
    rbf_type = hp.pop("rbf_type", "expnorm")
    if rbf_type != "expnorm":
        raise ValueError(f"{where}: rbf_type {rbf_type!r}: only 'expnorm' is implemented")
    for key in ("activation", "attn_activation"):
        if key in hp and hp[key] not in _ACTS:
            raise ValueError(f"{where}: {key} {hp[key]!r} unknown; known: {', '.join(_ACTS)}")
    if hp.get("distance_influence", "both") not in ("keys", "values", "both", "none"):
        raise ValueError(f"{where}: distance_influence {hp['distance_influence']!r} must be keys, values, both or none")
    dim, heads = int(hp.get("embedding_dimension", 128)), int(hp.get("num_heads", 8))
    if dim % heads:
        raise ValueError(f"{where}: embedding_dimension {dim} is not divisible by num_heads {heads}")
    if dim < 2:
        raise ValueError(f"{where}: embedding_dimension must be >= 2 (the output block halves it)")
    for k in ("r_max", "cutoff_lower"):
        if k in hp:
            hp[k] = float(hp[k])
    if hp.get("cutoff_lower", 0.0) >= hp["r_max"]:
        raise ValueError(f"{where}: cutoff_lower {hp['cutoff_lower']} must be below r_max {hp['r_max']}")
    return TorchMDNet(num_species=num_species, **hp)
