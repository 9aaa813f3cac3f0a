"""MACE (Batatia et al. 2022, NeurIPS) and BOTNet (Batatia et al. 2022a, "The Design Space of
E(3)-Equivariant Atom-Centered Interatomic Potentials") in Flax + e3nn-jax.

A block-by-block port of mace-torch (ACEsuit/mace, the 0.3 line that EGraFFBench trained with):

    mace-torch (mace/modules/)                     here
    ---------------------------------------------  ---------------------------------------------------
    node_attrs (one-hot)                           `jax.nn.one_hot(species)`
    LinearNodeEmbeddingBlock (o3.Linear)           `e3nn.flax.Linear(C x 0e)` on the one-hot
    SphericalHarmonics(l_max, normalize,           `e3nn.spherical_harmonics(..., normalize=True,
      "component") of r_receiver - r_sender          "component")` of -D (D = r_j - r_i is jaxbench's)
    RadialEmbeddingBlock: BesselBasis (fixed       `_embed`: `BesselBasis(trainable=False)`
      n*pi) * PolynomialCutoff(p)                    * `polynomial_cutoff(r, r_max, p)`, 0 on padding edges
    InteractionBlock (all four kinds below):       `Convolution`:
      linear_up (o3.Linear)                          `e3nn.flax.Linear`
      conv_tp_weights FullyConnectedNet(             `RadialMLP` (no biases, 1/sqrt(fan_in), normalised
        [8] + radial_MLP + [weight_numel], silu)      SiLU), masked on padding edges
      conv_tp: uvu TensorProduct(x_j, Y_ij)          the same paths and CG coefficients as
        onto the target irreps, per-edge weights      `e3nn.tensor_product(x_j, Y_ij, filter_ir_out=target)`,
                                                      per-(path, channel) weights; channel-minor layout
      scatter_sum(receiver)                          `jax.ops.segment_sum(..., receivers, n_node)`
      linear (o3.Linear) / avg_num_neighbors         per output irrep: W ~ N(0,1) / sqrt(fan_in) / avg_nn
      skip_tp: FullyConnectedTensorProduct(          `SpeciesLinear`: species-indexed `e3nn.flax.Linear`
        feats, one-hot)                               / sqrt(S) (the FCTP with a one-hot, normalisation incl.)
    RealAgnosticInteractionBlock (MACE, 1st)       `Convolution` then `SpeciesLinear` on the message, no sc
    RealAgnosticResidualInteractionBlock           sc = `SpeciesLinear`(h) onto the layer's output irreps
    EquivariantProductBasisBlock:                  `ProductBasis`:
      SymmetricContraction(correlation,              `SymmetricContraction` (per-species weights, the
        per-species weights)                          reduced symmetric basis of e3nn-jax, as mace-jax)
      linear (o3.Linear) [+ sc]                      `e3nn.flax.Linear` [+ sc]
    AgnosticNonlinearInteractionBlock (BOTNet 1st) `Convolution` then `SpeciesLinear` on the message
    AgnosticResidualNonlinearInteractionBlock      `Convolution` + `SpeciesLinear`(h) (residual)
    LinearReadoutBlock (o3.Linear -> 0e)           `e3nn.flax.Linear("0e")`
    NonLinearReadoutBlock (Linear -> MLP_irreps,   `NonLinearReadout` (same, e3nn-normalised gate)
      Activation(gate), Linear -> 0e)
    sum of readouts (+ E0, scale/shift)            sum of readouts; E0 / scale / shift live in `Potential`

MACE: layer 1 = RealAgnosticInteractionBlock + product (no sc); layers 2..n =
RealAgnosticResidualInteractionBlock + product (+ sc). The message irreps are C x (Y_0 + ... + Y_lmax)
("interaction irreps"); every layer outputs `hidden_irreps` except the last, which keeps only its
scalars. Linear readout on every layer but the last, non-linear readout on the last.

BOTNet: no product basis (body order grows by one per layer: correlation 1). Layer 1 =
AgnosticNonlinearInteractionBlock, layers 2..n = AgnosticResidualNonlinearInteractionBlock, all with
target = `hidden_irreps` (only irreps the tensor product reaches); linear readouts, non-linear last.
("Nonlinear" in those mace-torch names means the radial MLP; the node update itself is linear, which
is what keeps BOTNet body-ordered.)

Deviations from mace-torch (also in `models/mace.yaml`): the symmetric contraction uses e3nn-jax's
reduced symmetric coupling basis and mace-jax's weight normalisation (`SymmetricContraction`); edge
vectors are flipped to mace's sender -> receiver convention so even the signs of odd-l paths match.
Nothing changes the function class. Padding edges get zero radial features, hence zero TP weights
(the radial MLP has no biases and SiLU(0) = 0), and their weights are masked as well.
"""

from __future__ import annotations

import functools
import itertools
from math import comb
from typing import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import register
from .blocks import BesselBasis, polynomial_cutoff, safe_norm

_GATES = {"silu": jax.nn.silu, "tanh": jnp.tanh, "abs": jnp.abs, None: None, "none": None}


def _irreps(x) -> e3nn.Irreps:
    return e3nn.Irreps(x)


# ---------------------------------------------------------------------------------------------
# Small blocks
# ---------------------------------------------------------------------------------------------
class RadialMLP(nn.Module):
    """e3nn `FullyConnectedNet`: no biases, weights ~ N(0, 1) times 1/sqrt(fan_in) in the forward pass,
    normalised activation on the hidden layers only (so MLP(0) = 0)."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x):
        act = e3nn.normalize_function(jax.nn.silu)
        for i, h in enumerate(self.features):
            w = self.param(f"w{i}", nn.initializers.normal(1.0), (x.shape[-1], h), jnp.float32).astype(x.dtype)
            x = x @ (w * float(1.0 / np.sqrt(x.shape[-1])))
            if i < len(self.features) - 1:
                x = act(x)
        return x


class SpeciesLinear(nn.Module):
    """mace-torch `skip_tp = FullyConnectedTensorProduct(feats, S x 0e one-hot, irreps_out)`: with a
    one-hot second input this is a species-indexed linear map, and e3nn's path normalisation
    1/sqrt(mul_in * S) becomes the indexed linear's 1/sqrt(mul_in) times 1/sqrt(S)."""

    irreps_out: str
    num_species: int

    @nn.compact
    def __call__(self, species, x: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
        lin = e3nn.flax.Linear(self.irreps_out, num_indexed_weights=self.num_species, force_irreps_out=True, name="linear")
        return lin(species, x) * float(1.0 / np.sqrt(self.num_species))


@functools.lru_cache(maxsize=None)
def _conv_paths(irreps_in: str, irreps_sh: str, target: str):
    """mace-torch `tp_out_irreps_with_instructions`: every uvu path ir1 (x) ir2 -> ir3 with ir3 in
    `target`, in e3nn order (input chunk, SH chunk, ir3). Per input chunk: the CG tensor of all its
    paths stacked along the output axis, [sh_dim, d1, D_out], and [(path index, ir3, offset)].
    CGs carry e3nn's "component" normalisation sqrt(2 l3 + 1), as `e3nn.tensor_product`."""
    irreps_in, irreps_sh, target = _irreps(irreps_in), _irreps(irreps_sh), _irreps(target)
    keep = {ir for _, ir in target}
    per_chunk, p = [], 0
    for _, ir1 in irreps_in:
        cgs, paths, koff = [], [], 0
        for sl, (_, ir2) in zip(irreps_sh.slices(), irreps_sh):
            for ir3 in ir1 * ir2:
                if ir3 not in keep:
                    continue
                cg = np.zeros((irreps_sh.dim, ir1.dim, ir3.dim))
                cg[sl] = np.sqrt(ir3.dim) * np.asarray(e3nn.clebsch_gordan(ir1.l, ir2.l, ir3.l), np.float64).transpose(1, 0, 2)
                cgs.append(cg)
                paths.append((p, ir3, koff))
                p, koff = p + 1, koff + ir3.dim
        per_chunk.append((np.concatenate(cgs, axis=-1) if cgs else None, tuple(paths)))
    return tuple(per_chunk), p


class Convolution(nn.Module):
    """The message of every mace-torch interaction block:
    linear_up -> uvu TP with Y(r_ij), weights R(|r_ij|) -> sum over neighbours -> linear / avg_num_nb.

    `target_irreps` filters the tensor-product paths (`tp_out_irreps_with_instructions`); the final
    linear (e3nn `o3.Linear`: weights ~ N(0, 1), 1/sqrt(fan_in)) maps the paths of each ir3 onto the
    multiplicity of ir3 in `target_irreps`; irreps that no path reaches are dropped (`linear_out_irreps`).

    Same function as `e3nn.tensor_product(h[senders], Y, filter_ir_out=target)` times per-(path, channel)
    weights (tests/test_mace.py checks it), but laid out channel-minor ([edge, m, channel]) so that XLA
    on CPU vectorises over channels, with one small matmul (Y . CG, then x) and one scatter per input
    irrep instead of one einsum per path; paths are regrouped per output irrep at node level.
    """

    target_irreps: str
    avg_num_neighbors: float
    radial_mlp: Sequence[int]
    edge_block: int = 32

    @nn.compact
    def __call__(self, h, edge_sh, edge_feats, edge_mask, senders, receivers):
        target = _irreps(self.target_irreps)
        h = e3nn.flax.Linear(h.irreps, name="linear_up")(h)
        C = h.irreps[0].mul
        if any(mul != C for mul, _ in h.irreps):
            raise ValueError(f"uvu convolution needs one multiplicity for all input irreps, got {h.irreps}")
        per_chunk, num_paths = _conv_paths(str(h.irreps), str(edge_sh.irreps), str(target))
        n_node, n_edge, dtype = h.shape[0], edge_sh.shape[0], h.dtype
        # One weight per (path, channel): mace-torch's uvu `weight_numel`.
        w = RadialMLP(tuple(self.radial_mlp) + (num_paths * C,), name="conv_tp_weights")(edge_feats)
        w = jnp.where(edge_mask[:, None], w, 0.0).reshape(n_edge, num_paths, C)
        xs = [(jnp.swapaxes(chunk, 1, 2), ir1, jnp.asarray(cg.reshape(cg.shape[0], -1), dtype), paths)
              for ((_, ir1), chunk), (cg, paths) in zip(zip(h.irreps, h.chunks), per_chunk) if cg is not None]

        def messages(sh, w, snd, rcv):
            """Sum over this block of edges of the messages into every node, per input irrep: [N, D_out, C]."""
            e = sh.shape[0]
            out = []
            for x, ir1, cg, paths in xs:
                m = (sh @ cg).reshape(e, ir1.dim, -1)
                o = jnp.einsum("eik,eic->ekc", m, x[snd])  # [e, D_out, C]: all paths of this input irrep
                w_paths = [jnp.broadcast_to(w[:, p, None, :], (e, ir3.dim, C)) for p, ir3, _ in paths]
                out.append(jax.ops.segment_sum(o * jnp.concatenate(w_paths, axis=1), rcv, num_segments=n_node))
            return out

        # Edges go through in blocks (a scan; each block's intermediates recomputed in the backward
        # pass): the per-edge arrays ([E, D_out, C], 9 KB per edge) of a whole structure do not fit in
        # cache; blocks of `edge_block` edges do (3-4x less time on LiPS, BENCHMARKS.md). Padding edges
        # of the last block have zero weights: zero messages.
        n_blocks = -(-n_edge // self.edge_block)
        b = -(-n_edge // n_blocks)  # balanced blocks: at most n_blocks - 1 padding edges
        pad = n_blocks * b - n_edge
        blocked = (
            jnp.pad(edge_sh.array, ((0, pad), (0, 0))).reshape(n_blocks, b, -1),
            jnp.pad(w, ((0, pad), (0, 0), (0, 0))).reshape(n_blocks, b, num_paths, C),
            jnp.pad(senders, (0, pad)).reshape(n_blocks, b),
            jnp.pad(receivers, (0, pad)).reshape(n_blocks, b),
        )
        body = jax.checkpoint(messages)
        init = [jnp.zeros((n_node, sum(ir3.dim for _, ir3, _ in paths), C), dtype) for _, _, _, paths in xs]
        msgs, _ = jax.lax.scan(lambda acc, blk: ([a + m for a, m in zip(acc, body(*blk))], None), init, blocked)
        blocks: dict = {}
        for msg, (_, _, _, paths) in zip(msgs, xs):
            # Materialise the node-level sum (and, in the backward pass, its cotangent) so that XLA does
            # not fuse the node-level slicing below into the per-edge work and redo it for every edge.
            msg = jax.lax.optimization_barrier(msg)
            for p, ir3, k in paths:
                blocks.setdefault(ir3, []).append(msg[:, k : k + ir3.dim, :])
        irreps_out, outs = [], []
        for mul_out, ir3 in target:
            if ir3 not in blocks:
                continue
            msg = jnp.concatenate(blocks[ir3], axis=-1)  # [N, d3, paths * C]
            fan_in = msg.shape[-1]
            W = self.param(f"linear_{ir3}", nn.initializers.normal(1.0), (fan_in, mul_out), jnp.float32).astype(dtype)
            msg = msg @ (W * float(1.0 / (np.sqrt(fan_in) * self.avg_num_neighbors)))  # [N, d3, mul_out]
            outs.append(jnp.swapaxes(msg, 1, 2).reshape(n_node, mul_out * ir3.dim))
            irreps_out.append((mul_out, ir3))
        return e3nn.IrrepsArray(e3nn.Irreps(irreps_out), jnp.concatenate(outs, axis=-1))


# ---------------------------------------------------------------------------------------------
# Symmetric contraction (MACE eq. 10-11)
# ---------------------------------------------------------------------------------------------
def _multisets(dim: int, nu: int) -> list[tuple[int, ...]]:
    """Sorted index tuples a1 <= ... <= a_nu in colex order (by a_nu, then recursively), so that the
    tuples with a_nu = c extend exactly the first comb(c + nu - 1, nu - 1) tuples of degree nu - 1."""
    if nu == 1:
        return [(a,) for a in range(dim)]
    prev = _multisets(dim, nu - 1)
    return [t + (c,) for c in range(dim) for t in prev[: comb(c + nu - 1, nu - 1)]]


def _monomials(a: jax.Array, correlation: int, axis: int = 1) -> list[jax.Array]:
    """[x, x^(x)2, ...] of `a` along `axis` (the irreps components) restricted to sorted index tuples
    (colex order): products of static slices, no gathers (whose scatter-add transposes are slow on CPU)."""
    dim = a.shape[axis]

    def take(x, lo, hi):
        return jax.lax.slice_in_dim(x, lo, hi, axis=axis)

    out = [a]
    for nu in range(2, correlation + 1):
        prev = out[-1]
        out.append(jnp.concatenate([take(prev, 0, comb(c + nu - 1, nu - 1)) * take(a, c, c + 1) for c in range(dim)], axis))
    return out


@functools.lru_cache(maxsize=None)
def _product_basis(irreps_in: str, irreps_out: str, correlation: int):
    """The symmetric coupling basis, reduced to monomials.

    For nu = 1..correlation, e3nn-jax's `reduced_symmetric_tensor_product_basis` U_nu[a1..a_nu, k, i]
    spans the permutation-symmetric equivariant maps (irreps_in)^nu -> ir_out. Because U_nu is contracted
    with x_a1 ... x_a_nu, only its sum over index permutations matters: U_red[m] sums U_nu over all
    index tuples whose sorted tuple is the monomial m (`_multisets` order). Returns
    {(nu, ir): U_red[M_nu, K, ir.dim] / nu}.
    """
    irreps_in, irreps_out = _irreps(irreps_in), _irreps(irreps_out)
    dim = irreps_in.dim
    bases = {}
    for nu in range(1, correlation + 1):
        index = {c: i for i, c in enumerate(_multisets(dim, nu))}
        full_to_mono = np.array([index[tuple(sorted(t))] for t in itertools.product(range(dim), repeat=nu)])
        U = e3nn.reduced_symmetric_tensor_product_basis(irreps_in, nu, keep_ir=[ir for _, ir in irreps_out])
        for (mul, ir), u in zip(U.irreps, U.chunks):
            if u is None or mul == 0:
                continue
            red = np.zeros((len(index), mul, ir.dim))
            np.add.at(red, full_to_mono, np.asarray(u, np.float64).reshape(dim**nu, mul, ir.dim))
            bases[(nu, ir)] = red / nu  # mace-jax normalisation (numerically checked there)
    return bases


@functools.lru_cache(maxsize=None)
def _sparse_terms(irreps_in: str, irreps_out: str, correlation: int):
    """The non-zero (monomial, output component) pairs of the reduced basis, for outputs that use few
    monomials (scalars: ~10% of them). Returns ({(nu, ir): (U[T_b, K], first term)} with the terms
    in (output irrep, nu) blocks, the permutation that sorts them by output component, their monomial
    factors in that order ([correlation, T] indices into x with a trailing 1 at index dim), and the
    bounds of each output component's run of terms."""
    bases = _product_basis(irreps_in, irreps_out, correlation)
    dim = _irreps(irreps_in).dim
    blocks, factors, component = {}, [], []
    offset = 0
    for _, ir in _irreps(irreps_out):
        for nu in range(1, correlation + 1):
            if (nu, ir) not in bases:
                continue
            u = bases[(nu, ir)]
            nz = np.argwhere(np.abs(u).max(axis=1) > 1e-12)  # (monomial, component) pairs
            blocks[(nu, ir)] = (u[nz[:, 0], :, nz[:, 1]], len(factors))
            tuples = _multisets(dim, nu)
            for m, i in nz:
                t = tuples[m]
                factors.append(tuple(t) + (dim,) * (correlation - nu))
                component.append(offset + i)
        offset += ir.dim
    component = np.array(component, np.int32)
    order = np.argsort(component, kind="stable")  # terms of one component contiguous
    bounds = tuple(int(b) for b in np.searchsorted(component[order], np.arange(offset + 1)))
    return blocks, order, np.array(factors, np.int32)[order].T, bounds


class SymmetricContraction(nn.Module):
    """Per channel c and species s:  B_c = sum_nu sum_k w^{nu}_{s,k,c} (U_nu[k] . A_c^{(x) nu}).

    mace-torch `SymmetricContraction` with `num_elements` = S. Deviation: the coupling basis is
    e3nn-jax's reduced symmetric basis (as mace-jax and mace-torch's `use_reduced_cg`), not the
    mace-torch 0.3 Wigner-chain `U_matrix_real` (which holds linearly dependent couplings and hence more
    weights for the same function space); weights ~ N(0, 1) with 1/sqrt(K) in the forward pass (mace-jax)
    instead of torch's N(0, 1)/K init.

    Two evaluations of the same sum, chosen by how many monomials the outputs use (CPU-friendly; both
    checked against the full U tensors in tests/test_mace.py):

    * dense (vector outputs use most monomials): the species weights are folded into the basis,
      G[s, m, i, c] = sum_k U[m, k, i] w[s, k, c] (independent of the number of atoms), then the
      symmetric monomials of x, [n, m, c], meet G in one matmul batched over channels, and a one-hot
      selects each atom's species. The monomials (968 per channel for 16-dim input at correlation 3)
      do not fit in cache for a whole structure, so atoms go through in blocks of `block` (a lax.map):
      2.4x less time on 200 atoms than all at once (BENCHMARKS.md).
    * sparse (scalar outputs use ~10% of the monomials): only the non-zero (monomial, component) terms,
      each a product of gathered components of x times its species' folded weight.
    """

    irreps_out: str  # per channel, e.g. "0e+1o+2e"
    correlation: int
    num_species: int
    block: int = 8

    @nn.compact
    def __call__(self, x: e3nn.IrrepsArray, species_onehot) -> e3nn.IrrepsArray:
        # x: [N, C, irreps_in] (channels on their own axis)
        n, C = x.shape[0], x.shape[1]
        irreps_out = _irreps(self.irreps_out)
        bases = _product_basis(str(x.irreps), str(irreps_out), self.correlation)
        a = jnp.swapaxes(x.array, 1, 2)  # [N, dim, C]: channel-minor, XLA vectorises over channels
        onehot = species_onehot.astype(a.dtype)
        weights = {}
        for _, ir in irreps_out:
            for nu in range(1, self.correlation + 1):
                if (nu, ir) in bases:
                    k = bases[(nu, ir)].shape[1]
                    w = self.param(f"w{nu}_{ir}", nn.initializers.normal(1.0), (self.num_species, k, C), jnp.float32)
                    weights[(nu, ir)] = w.astype(a.dtype) * float(1.0 / np.sqrt(k))
        sparse = _sparse_terms(str(x.irreps), str(irreps_out), self.correlation)
        n_mono = sum(comb(a.shape[1] + nu - 1, nu) for nu in range(1, self.correlation + 1))
        if 4 * len(sparse[1]) <= n_mono:
            out = self._sparse(a, onehot, weights, *sparse)
        else:
            out = self._dense(a, onehot, weights, bases, irreps_out)
        return e3nn.IrrepsArray(irreps_out, out)

    def _dense(self, a, onehot, weights, bases, irreps_out):
        n, dim, C = a.shape
        S = self.num_species
        sizes = [comb(dim + nu - 1, nu) for nu in range(1, self.correlation + 1)]
        blocks_ir = []
        for _, ir in irreps_out:
            blocks = []
            for nu in range(1, self.correlation + 1):
                if (nu, ir) in bases:
                    u = jnp.asarray(bases[(nu, ir)], a.dtype)
                    blocks.append(jnp.einsum("mki,skc->cmsi", u, weights[(nu, ir)]))
                else:
                    blocks.append(jnp.zeros((C, sizes[nu - 1], S, ir.dim), a.dtype))
            blocks_ir.append(jnp.concatenate(blocks, axis=1))
        # [C, M, S * D_out]: channel-major, the batch axis of the matmul below, built once outside the
        # atom loop (in [S, M, D, C] XLA re-laid the 3 MB tensor out for every block, forward and backward)
        G = jnp.concatenate(blocks_ir, axis=3).reshape(C, sum(sizes), -1)
        D = G.shape[-1] // S

        def contract(a, onehot):
            x = jnp.transpose(a, (2, 0, 1))  # [C, b, dim]
            mono = jnp.concatenate(_monomials(x, self.correlation, axis=2), axis=2)  # [C, b, M]
            out = jax.lax.dot_general(mono, G, (((2,), (1,)), ((0,), (0,))))  # [C, b, S * D]
            out = out.reshape(C, -1, S, D)
            return jnp.einsum("cbsi,bs->bci", out, onehot)

        n_blocks = -(-n // self.block)
        b = -(-n // n_blocks)  # balanced blocks of at most `block` atoms
        pad = n_blocks * b - n  # zero atoms: zero monomials, no species -> zero output, dropped
        a = jnp.pad(a, ((0, pad), (0, 0), (0, 0))).reshape(n_blocks, b, dim, C)
        onehot = jnp.pad(onehot, ((0, pad), (0, 0))).reshape(n_blocks, b, -1)
        out = jax.lax.map(lambda xs: contract(*xs), (a, onehot))
        return out.reshape(n_blocks * b, C, -1)[:n]

    def _sparse(self, a, onehot, weights, blocks, order, factors, bounds):
        folded = [jnp.einsum("tk,skc->stc", jnp.asarray(u, a.dtype), weights[key]) for key, (u, _) in blocks.items()]
        G = jnp.concatenate(folded, axis=1)[:, order]  # [S, T, C], sorted by output component
        terms = jnp.einsum("ns,stc->ntc", onehot, G)
        x1 = jnp.concatenate([a, jnp.ones_like(a[:, :1])], axis=1)  # index dim -> 1 (lower degrees)
        for f in factors:
            terms = terms * x1[:, f]
        return jnp.stack([jnp.sum(terms[:, lo:hi], axis=1) for lo, hi in zip(bounds[:-1], bounds[1:])], axis=-1)


class ProductBasis(nn.Module):
    """mace-torch `EquivariantProductBasisBlock`: symmetric contraction, linear, optional residual."""

    target_irreps: str
    correlation: int
    num_species: int

    @nn.compact
    def __call__(self, msg: e3nn.IrrepsArray, species_onehot, sc=None):
        target = _irreps(self.target_irreps)
        C = msg.irreps[0].mul
        per_channel = e3nn.Irreps([ir for _, ir in target])
        x = msg.mul_to_axis(C)  # [N, C, 0e+1o+...]
        b = SymmetricContraction(str(per_channel), self.correlation, self.num_species, name="symmetric_contraction")(
            x, species_onehot
        )
        b = b.axis_to_mul()
        out = e3nn.flax.Linear(target, force_irreps_out=True, name="linear")(b)
        return out if sc is None else out + sc


class NonLinearReadout(nn.Module):
    mlp_irreps: str
    gate: str | None

    @nn.compact
    def __call__(self, h):
        x = e3nn.flax.Linear(self.mlp_irreps, force_irreps_out=True, name="linear_1")(h)
        x = e3nn.scalar_activation(x, [_GATES[self.gate]] * len(x.irreps))
        return e3nn.flax.Linear("0e", force_irreps_out=True, name="linear_2")(x)


def _embed(vectors, species, edge_mask, r_max, num_bessel, p, max_ell, num_species, num_channels):
    """Node embedding, edge spherical harmonics and radial features (shared by MACE and BOTNet)."""
    dtype = vectors.dtype
    # mace-torch edge vectors point sender -> receiver (r_i - r_j); jaxbench's D = r_j - r_i.
    vec = -vectors
    r = safe_norm(vec, axis=-1)
    sh = e3nn.spherical_harmonics(
        e3nn.Irreps.spherical_harmonics(max_ell), e3nn.IrrepsArray("1o", vec), normalize=True, normalization="component"
    )
    # (.astype: blocks.BesselBasis's numpy-float64 prefactor would promote float32 inputs under x64)
    bessel = BesselBasis(r_max=r_max, num_basis=num_bessel, trainable=False, name="bessel")(r).astype(dtype)
    edge_feats = bessel * polynomial_cutoff(r, r_max, p)[:, None]
    edge_feats = jnp.where(edge_mask[:, None], edge_feats, 0.0)
    onehot = jax.nn.one_hot(species, num_species, dtype=dtype)
    h = e3nn.flax.Linear(f"{num_channels}x0e", name="node_embedding")(
        e3nn.IrrepsArray(f"{num_species}x0e", onehot)
    )
    return h, sh, edge_feats, onehot


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
class MACE(nn.Module):
    num_species: int
    avg_num_neighbors: float
    r_max: float
    num_bessel: int = 8
    num_polynomial_cutoff: int = 5
    max_ell: int = 3
    num_interactions: int = 2
    correlation: int = 3
    hidden_irreps: str = "16x0e+16x1o+16x2e"
    mlp_irreps: str = "16x0e"
    radial_mlp: Sequence[int] = (64, 64, 64)
    gate: str | None = "silu"

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, edge_mask, node_mask):
        hidden = _irreps(self.hidden_irreps)
        C = hidden.count("0e")
        if any(mul != C for mul, _ in hidden):
            raise ValueError(f"MACE needs the same multiplicity for every hidden irrep, got {hidden}")
        h, sh, edge_feats, onehot = _embed(
            vectors, species, edge_mask, self.r_max, self.num_bessel, self.num_polynomial_cutoff,
            self.max_ell, self.num_species, C,
        )
        # Message irreps: C copies of every spherical harmonic (mace-torch `interaction_irreps`).
        inter_irreps = str((C * e3nn.Irreps.spherical_harmonics(self.max_ell)).sort().irreps.simplify())
        conv = dict(avg_num_neighbors=self.avg_num_neighbors, radial_mlp=tuple(self.radial_mlp))
        energy = jnp.zeros(h.shape[0], vectors.dtype)
        for i in range(self.num_interactions):
            last = i == self.num_interactions - 1
            out_irreps = f"{C}x0e" if last else str(hidden)
            msg = Convolution(inter_irreps, **conv, name=f"interaction_{i}")(h, sh, edge_feats, edge_mask, senders, receivers)
            if i == 0:  # RealAgnosticInteractionBlock: species mixing of the message, no residual
                msg = SpeciesLinear(inter_irreps, self.num_species, name=f"skip_tp_{i}")(species, msg)
                sc = None
            else:  # RealAgnosticResidualInteractionBlock
                sc = SpeciesLinear(out_irreps, self.num_species, name=f"skip_tp_{i}")(species, h)
            h = ProductBasis(out_irreps, self.correlation, self.num_species, name=f"product_{i}")(msg, onehot, sc)
            if last and i > 0:  # (a single-layer mace-torch model has only the linear readout)
                e = NonLinearReadout(self.mlp_irreps, self.gate, name=f"readout_{i}")(h)
            else:
                e = e3nn.flax.Linear("0e", force_irreps_out=True, name=f"readout_{i}")(h)
            energy = energy + e.array[:, 0]
        return jnp.where(node_mask, energy, 0.0)


class BOTNet(nn.Module):
    num_species: int
    avg_num_neighbors: float
    r_max: float
    num_bessel: int = 8
    num_polynomial_cutoff: int = 5
    max_ell: int = 3
    num_interactions: int = 5
    hidden_irreps: str = "16x0e+16x1o+16x2e"
    mlp_irreps: str = "16x0e"
    radial_mlp: Sequence[int] = (64, 64, 64)
    gate: str | None = "silu"

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, edge_mask, node_mask):
        hidden = _irreps(self.hidden_irreps)
        C = hidden.count("0e")
        h, sh, edge_feats, _ = _embed(
            vectors, species, edge_mask, self.r_max, self.num_bessel, self.num_polynomial_cutoff,
            self.max_ell, self.num_species, C,
        )
        conv = dict(avg_num_neighbors=self.avg_num_neighbors, radial_mlp=tuple(self.radial_mlp))
        energy = jnp.zeros(h.shape[0], vectors.dtype)
        for i in range(self.num_interactions):
            # irreps_out = linear_out_irreps(irreps_mid, hidden): the hidden irreps the TP reaches.
            msg = Convolution(str(hidden), **conv, name=f"interaction_{i}")(h, sh, edge_feats, edge_mask, senders, receivers)
            if i == 0:  # AgnosticNonlinearInteractionBlock: skip_tp(message, one-hot)
                h = SpeciesLinear(str(msg.irreps), self.num_species, name=f"skip_tp_{i}")(species, msg)
            else:  # AgnosticResidualNonlinearInteractionBlock: message + skip_tp(h, one-hot)
                h = msg + SpeciesLinear(str(msg.irreps), self.num_species, name=f"skip_tp_{i}")(species, h)
            if i == self.num_interactions - 1 and i > 0:
                e = NonLinearReadout(self.mlp_irreps, self.gate, name=f"readout_{i}")(h)
            else:
                e = e3nn.flax.Linear("0e", force_irreps_out=True, name=f"readout_{i}")(h)
            energy = energy + e.array[:, 0]
        return jnp.where(node_mask, energy, 0.0)


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------
def _common(hp: dict) -> dict:
    hp = dict(hp)
    hp["hidden_irreps"] = str(_irreps(hp.get("hidden_irreps", "16x0e+16x1o+16x2e")))
    hp["mlp_irreps"] = str(_irreps(hp.get("mlp_irreps", "16x0e")))
    if "radial_mlp" in hp:
        hp["radial_mlp"] = tuple(int(x) for x in hp["radial_mlp"])
    if hp.get("gate", "silu") not in _GATES:
        raise ValueError(f"unknown gate {hp['gate']!r}; one of {sorted(k for k in _GATES if k)}")
    return hp


@register("mace")
def build_mace(num_species: int, avg_num_neighbors: float, **hyperparameters) -> nn.Module:
    return MACE(num_species=num_species, avg_num_neighbors=float(avg_num_neighbors), **_common(hyperparameters))


@register("botnet")
def build_botnet(num_species: int, avg_num_neighbors: float, **hyperparameters) -> nn.Module:
    hp = _common(hyperparameters)
    if int(hp.pop("correlation", 1)) != 1:
        raise ValueError("BOTNet is body-ordered with correlation order 1 (use architecture 'mace' for more)")
    return BOTNet(num_species=num_species, avg_num_neighbors=float(avg_num_neighbors), **hp)
