"""Small pieces shared by the model files: radial bases, cutoffs, safe norms, masked sums."""

from __future__ import annotations

import math

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def safe_norm(vectors: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """|v| with a finite gradient at v = 0 (padding edges are never zero-length, but be safe)."""
    sq = jnp.sum(vectors**2, axis=axis, keepdims=keepdims)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def polynomial_cutoff(r: jax.Array, r_max: float, p: float = 6.0) -> jax.Array:
    """NequIP / DimeNet polynomial envelope: 1 at r = 0, smooth (C^2) to 0 at r_max, 0 beyond."""
    x = r / r_max
    env = (
        1.0
        - (p + 1.0) * (p + 2.0) / 2.0 * x**p
        + p * (p + 2.0) * x ** (p + 1.0)
        - p * (p + 1.0) / 2.0 * x ** (p + 2.0)
    )
    return jnp.where(x < 1.0, env, 0.0)


class BesselBasis(nn.Module):
    """sqrt(2/r_max) sin(n pi r / r_max) / r, n = 1..num_basis, optionally trainable frequencies
    (NequIP; MACE uses the same with fixed frequencies)."""

    r_max: float
    num_basis: int = 8
    trainable: bool = True

    @nn.compact
    def __call__(self, r: jax.Array) -> jax.Array:
        init = lambda key, shape, dtype=jnp.float32: jnp.arange(1, self.num_basis + 1, dtype=dtype) * np.pi  # noqa: E731
        if self.trainable:
            freqs = self.param("bessel_weights", init, (self.num_basis,))
        else:
            freqs = init(None, (self.num_basis,))
        freqs = freqs.astype(r.dtype)
        r_safe = jnp.where(r > 0, r, 1.0)[..., None]
        prefactor = float(np.sqrt(2.0 / self.r_max))
        return prefactor * jnp.sin(freqs * r_safe / self.r_max) / r_safe


def masked_sum_to_graphs(node_values: jax.Array, node_graph: jax.Array, node_mask: jax.Array, num_graphs: int):
    return jax.ops.segment_sum(jnp.where(node_mask, node_values, 0.0), node_graph, num_segments=num_graphs)


def sh_cg_blocks(ir_in, irreps_sh, allowed):
    """Clebsch–Gordan blocks of one input irrep times every spherical-harmonic irrep, for the outputs in
    ``allowed``, in e3nn's instruction order (SH outermost, then ``ir_in * ir_sh``).

    Returns ``(blocks, outs)``: ``blocks[q]`` is ``[d_sh, ir_in.dim, ir_out.dim]`` (the CG coefficients
    placed at SH ``j``'s rows, zero elsewhere; e3nn-jax coefficients times sqrt(2 l_out + 1), e3nn's
    "component" normalisation) and ``outs[q]`` its output irrep. Contracting ``sh [E, d_sh]`` and
    ``x [E, ir_in.dim]`` with a block gives that path's output without slicing the SH per path."""
    irreps_sh = e3nn.Irreps(irreps_sh)
    sh_off = np.cumsum([0] + [ir.dim for _, ir in irreps_sh])
    blocks, outs = [], []
    for j, (_, ir_sh) in enumerate(irreps_sh):
        for ir_out in ir_in * ir_sh:
            if ir_out in allowed:
                cg = e3nn.clebsch_gordan(ir_in.l, ir_sh.l, ir_out.l) * math.sqrt(ir_out.dim)  # [a, b, c]
                block = np.zeros((int(sh_off[-1]), ir_in.dim, ir_out.dim))
                block[sh_off[j] : sh_off[j + 1]] = np.transpose(cg, (1, 0, 2))
                blocks.append(block)
                outs.append(ir_out)
    return blocks, outs
