"""NequIP (Batzner et al. 2022, Nat. Commun. 13, 2453) in Flax + e3nn-jax.

A block-by-block port of the classic mir-group/nequip 0.6 `EnergyModel` (SimpleIrrepsConfig +
EnergyModel). With the same weights it reproduces nequip 0.6.2's per-atom energies and forces (checked
on ethanol and LiPS, float64: 1e-16 relative for l_max <= 1, ~1e-7 for l_max 2, the precision of
e3nn-torch's stored constants). Every parameter has nequip's shape and layout.

    nequip 0.6                                 here
    ---------------------------------------    -----------------------------------------------------
    OneHotAtomEncoding                          `jax.nn.one_hot(species)` (node attrs, S x 0e)
    SphericalHarmonicEdgeAttrs                  `e3nn.spherical_harmonics(0e+1o+2e.., D, normalize=True,
      (normalize=True, "component")               normalization="component")`, D = r_j - r_i
    RadialBasisEdgeEncoding:                    `blocks.BesselBasis` (trainable n*pi; rescaled to nequip's
      BesselBasis (2/r_max sin(n pi r/r_max)/r)   2/r_max prefactor) x `blocks.polynomial_cutoff(r, p)`
      x PolynomialCutoff(p)
    chemical_embedding (AtomwiseLinear)         `e3nn.flax.Linear(F x 0e)` on the one-hot
    layer{i}_convnet (ConvNetLayer):            `NequIP.__call__` loop:
      conv = InteractionBlock:                    `InteractionBlock`:
        sc  FullyConnectedTensorProduct(x,          `_self_connection`: (x (x) one-hot) @ W, W [mul, S, mul']
            one-hot, irreps_out)                      as e3nn's "uvw" weights, same normalisation
        linear_1 (o3.Linear)                        `e3nn.flax.Linear`
        fc  FullyConnectedNet([nb]+L*[n]+[numel])   `RadialMLP` + last layer (`fc_w{L}`): no biases,
                                                      N(0,1) weights / sqrt(fan_in), normalised SiLU
        tp  TensorProduct uvu(x_j, Y_ij, weights)   per input irrep chunk: CG contracted with Y_ij, then
                                                      with x_j; times the per-edge weights
        scatter(edge_dst) / sqrt(avg_num_nb)        `jax.ops.segment_sum(..., receivers)` / sqrt(avg_num_nb)
        linear_2 o3.Linear(irreps_mid.sort()        per output irrep: the paths with that output, path-major,
                 .simplify() -> irreps_out)           (n_paths * mul) -> mul_out, e3nn normalisation
        x + sc
      equivariant_nonlin = Gate (inputs sorted    `_gate` (same sorted layout, scalars e:silu o:tanh,
        by irrep, as e3nn's Gate)                   gates e:silu o:tanh, normalised to unit 2nd moment)
      resnet if layer irreps_out == irreps_in     same rule (nequip's `resnet` option; its default false)
    conv_to_output_hidden (AtomwiseLinear)      `e3nn.flax.Linear(max(1, F//2) x 0e)`
    output_hidden_to_scalar (AtomwiseLinear)    `e3nn.flax.Linear(1x0e)` -> per-atom energy
    PerSpeciesScaleShift / RescaleOutput        in `jaxbench.potential.Potential`, not here

Irreps follow nequip's `SimpleIrrepsConfig`: features F x l^p for p in (e, o) (only e without parity),
l <= l_max; edge SH with p = -1 (or +1 without parity); in every layer only irreps with a
tensor-product path from the layer's input are created, exactly as `ConvNetLayer` prunes them.

Performance notes (XLA:CPU; see `InteractionBlock`): the radial weights are spread over each path's
2l+1 components on the parameter side (one matmul per input chunk gives [E, mul, K] weights), there is
one scatter per input chunk, and linear_2 reads the node sums through a 0/1 permutation matmul (slices
there made XLA recompute their backward once per edge inside the segment_sum-backward gather).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import register
from .blocks import BesselBasis, polynomial_cutoff, sh_cg_blocks

# ---------------------------------------------------------------------------------------------
# Activations, normalised to unit second moment under N(0, 1) as e3nn's `normalize2mom`
# ---------------------------------------------------------------------------------------------
_ACTS = {
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "abs": jnp.abs,
    "ssp": lambda x: jax.nn.softplus(x) - math.log(2.0),
}
_NP_ACTS = {
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "abs": np.abs,
    "ssp": lambda x: np.logaddexp(0.0, x) - math.log(2.0),
}


# e3nn-torch's `normalize2mom(f).cst` (a Monte-Carlo estimate, 1e6 samples, seed 0), so that nequip
# weights carry over unchanged; the exact values differ by ~0.2%.
_E3NN_TORCH_CONSTANTS = {"silu": 1.6791767923989418, "tanh": 1.5937334472592695, "abs": 1.001110600838467,
                         "ssp": 1.878204668541552}


@functools.lru_cache(maxsize=None)
def _second_moment_constant(name: str) -> float:
    """1 / sqrt(E_{z~N(0,1)} f(z)^2): e3nn-torch's value, else by Gauss-Hermite quadrature."""
    if name in _E3NN_TORCH_CONSTANTS:
        return _E3NN_TORCH_CONSTANTS[name]
    x, w = np.polynomial.hermite_e.hermegauss(200)
    w = w / w.sum()
    return float(1.0 / np.sqrt(np.sum(w * _NP_ACTS[name](x) ** 2)))


def normalized_act(name: str):
    f, c = _ACTS[name], _second_moment_constant(name)
    return lambda x: c * f(x)


def tp_path_exists(irreps_in1, irreps_in2, ir_out) -> bool:
    irreps_in1, irreps_in2 = e3nn.Irreps(irreps_in1).simplify(), e3nn.Irreps(irreps_in2).simplify()
    ir_out = e3nn.Irrep(ir_out)
    return any(ir_out in ir1 * ir2 for _, ir1 in irreps_in1 for _, ir2 in irreps_in2)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class RadialMLP(nn.Module):
    """e3nn `FullyConnectedNet`: no biases, weights ~ N(0,1) scaled by 1/sqrt(fan_in), normalised
    activation between layers (and after the last with `act_last`)."""

    features: Sequence[int]
    act: str = "silu"
    act_last: bool = False  # also apply the activation after the last layer

    @nn.compact
    def __call__(self, x):
        act = normalized_act(self.act)
        for i, h in enumerate(self.features):
            w = self.param(f"w{i}", nn.initializers.normal(1.0), (x.shape[-1], h), jnp.float32).astype(x.dtype)
            x = x @ (w / np.sqrt(x.shape[-1]).astype(x.dtype))
            if i < len(self.features) - 1 or self.act_last:
                x = act(x)
        return x


def _conv_irreps(irreps_in: e3nn.Irreps, irreps_sh: e3nn.Irreps, hidden: e3nn.Irreps):
    """ConvNetLayer's irreps bookkeeping -> (gate_plan, conv_irreps_out, layer_out).

    As e3nn's `Gate`, the convolution outputs scalars + gates + gated *sorted* by irrep (stable) and
    simplified (e.g. 4x0o+20x0e+... where 20x0e = 4 scalars then 16 gates); `gate_plan` lists the sorted
    pieces as (kind, index, mul, irrep), kind in {"scalar", "gate", "gated"}. The gate's output (the next
    layer's input) is scalars + gated in their original order, as in nequip."""
    scalars = e3nn.Irreps([(m, ir) for m, ir in hidden if ir.l == 0 and tp_path_exists(irreps_in, irreps_sh, ir)])
    gated = e3nn.Irreps([(m, ir) for m, ir in hidden if ir.l > 0 and tp_path_exists(irreps_in, irreps_sh, ir)])
    gate_ir = e3nn.Irrep("0e" if tp_path_exists(irreps_in, irreps_sh, "0e") else "0o")
    pieces = [("scalar", i, m, ir) for i, (m, ir) in enumerate(scalars)]
    pieces += [("gate", i, m, gate_ir) for i, (m, _) in enumerate(gated)]
    pieces += [("gated", i, m, ir) for i, (m, ir) in enumerate(gated)]
    gate_plan = tuple(sorted(pieces, key=lambda t: (t[3].l, t[3].p)))  # stable, as Irreps.sort()
    conv_out = e3nn.Irreps([(m, ir) for _, _, m, ir in gate_plan]).simplify()
    layer_out = (scalars + gated).simplify()
    return gate_plan, conv_out, layer_out


def _gate(x: jax.Array, gate_plan, act_scalars, act_gates) -> jax.Array:
    """e3nn `Gate` on a flat [N, dim] array laid out as `gate_plan` (sorted scalars/gates/gated);
    returns act(scalars) | gated * act(gates), both in their original (unsorted) order."""
    parts = {"scalar": {}, "gate": {}, "gated": {}}
    off = 0
    for kind, i, mul, ir in gate_plan:
        parts[kind][i] = (mul, ir, x[:, off : off + mul * ir.dim])
        off += mul * ir.dim
    outs = [normalized_act(act_scalars[ir.p])(c) for _, (_, ir, c) in sorted(parts["scalar"].items())]
    for i, (mul, ir, c) in sorted(parts["gated"].items()):
        _, gir, g = parts["gate"][i]
        g = normalized_act(act_gates[gir.p])(g)
        outs.append((c.reshape(-1, mul, ir.dim) * g[:, :, None]).reshape(-1, mul * ir.dim))
    return jnp.concatenate(outs, axis=-1)


@functools.lru_cache(maxsize=None)
def _uvu_plan(irreps_in: str, irreps_sh: str, irreps_out: str):
    """Static plan of nequip's InteractionBlock tensor product.

    Instructions as nequip builds them: i over the node irreps, j over the SH irreps, ir_out in
    ir_i * ir_j, kept if ir_out is in `irreps_out`; each has its own output slot (mul_i x ir_out, "uvu").

    Returns (chunks, mul, n_paths, groups, sort_perm):
      chunks: per input chunk i with paths, (offset of the chunk in x, ir_i.dim, CG [d_sh, d_i, K_i] with
        the chunk's paths side by side along K (e3nn-jax coefficients times sqrt(2 l_out + 1): e3nn's
        "component" normalisation), expand [n_paths_i, K_i] (0/1: path -> its components));
      groups: [(ir_out, n_paths with that output)], and sort_perm [K, K] (0/1) reordering the
        concatenated components of all chunks so that each group's paths are consecutive, in
        instruction order: the layout of nequip's sorted `irreps_mid` (what linear_2 reads)."""
    irreps_in, irreps_sh, irreps_out = e3nn.Irreps(irreps_in), e3nn.Irreps(irreps_sh), e3nn.Irreps(irreps_out)
    allowed = [ir for _, ir in irreps_out]
    muls = {mul for mul, _ in irreps_in}
    assert len(muls) == 1, "nequip node features share one multiplicity"
    chunks, paths, x_off, k0 = [], [], 0, 0  # paths: (ir_out, first component in the concatenation)
    for mul, ir_in in irreps_in:
        blocks, outs = sh_cg_blocks(ir_in, irreps_sh, allowed)
        if outs:
            k_i = sum(ir.dim for ir in outs)
            expand = np.zeros((len(outs), k_i))
            kk = 0
            for q, ir in enumerate(outs):
                expand[q, kk : kk + ir.dim] = 1.0
                paths.append((ir, k0 + kk))
                kk += ir.dim
            chunks.append((x_off, ir_in.dim, np.concatenate(blocks, axis=-1), expand))
            k0 += k_i
        x_off += mul * ir_in.dim
    groups = {}
    for ir, start in paths:
        groups.setdefault(ir, []).append(start)
    order = [start + c for ir, starts in groups.items() for start in starts for c in range(ir.dim)]
    sort_perm = np.zeros((k0, k0))
    sort_perm[order, np.arange(k0)] = 1.0
    return chunks, muls.pop(), len(paths), [(ir, len(starts)) for ir, starts in groups.items()], sort_perm


class InteractionBlock(nn.Module):
    """nequip `InteractionBlock` (self-connection, linear_1, radial fc, uvu tp, scatter, linear_2)."""

    irreps_in: str
    irreps_out: str  # conv_irreps_out (scalars + gates + gated, sorted as e3nn's Gate.irreps_in)
    irreps_sh: str
    num_species: int
    avg_num_neighbors: float
    invariant_layers: int
    invariant_neurons: int
    radial_act: str = "silu"
    use_sc: bool = True

    @nn.compact
    def __call__(self, x: e3nn.IrrepsArray, species, sh: jax.Array, edge_embedding, senders, receivers):
        irreps_out = e3nn.Irreps(self.irreps_out)
        n_node, n_edge, dtype = x.shape[0], sh.shape[0], sh.dtype
        if self.use_sc:
            sc = self._self_connection(x, jax.nn.one_hot(species, self.num_species, dtype=dtype))
        x = e3nn.flax.Linear(x.irreps, name="linear_1")(x)

        # -- uvu tensor product x_j (x) Y_ij with per-edge, per-channel, per-path weights; scatter --
        chunks, mul, n_paths, groups, sort_perm = _uvu_plan(str(x.irreps), self.irreps_sh, self.irreps_out)
        # Radial network (e3nn FullyConnectedNet, no biases). Its last layer is applied here: the
        # parameter keeps e3nn's uvu weight layout ([hidden, n_paths * mul], instruction-major) and is
        # spread on the parameter side over each path's 2l+1 output components, so that one matmul per
        # input chunk gives the per-edge weight of every component, [E, mul, K].
        hidden = RadialMLP((self.invariant_neurons,) * self.invariant_layers, self.radial_act, True, name="fc")(
            edge_embedding
        )
        h_dim = hidden.shape[-1]
        w_last = self.param(
            f"fc_w{self.invariant_layers}", nn.initializers.normal(1.0), (h_dim, n_paths * mul), jnp.float32
        )
        w_last = (w_last.astype(dtype) / np.sqrt(h_dim).astype(dtype)).reshape(h_dim, n_paths, mul)
        x_j = x.array[senders]
        norm = 1.0 / math.sqrt(self.avg_num_neighbors)
        sums, p0 = [], 0
        for x_off, d, cg, expand in chunks:
            n_p = expand.shape[0]
            xa = x_j[:, x_off : x_off + mul * d].reshape(n_edge, mul, d)
            m = jnp.einsum("eb,bak->eak", sh, jnp.asarray(cg, dtype))  # Y_ij contracted with the CG: [E, d, K]
            tp = jnp.einsum("eua,eak->euk", xa, m)  # [E, mul, K]: all paths of this chunk, unweighted
            w_exp = jnp.einsum("hpu,pk->huk", w_last[:, p0 : p0 + n_p], jnp.asarray(expand, dtype))
            w = (hidden @ w_exp.reshape(h_dim, -1)).reshape(n_edge, mul, -1)
            p0 += n_p
            # one scatter per chunk: a concatenation at the edge level costs a full extra pass
            sums.append(jax.ops.segment_sum(tp * w, receivers, num_segments=n_node) * norm)  # [N, mul, K]
        agg = jnp.concatenate(sums, axis=-1) if len(sums) > 1 else sums[0]  # [N, mul, K_total]

        # -- linear_2: o3.Linear(irreps_mid sorted + simplified -> irreps_out) --
        # For output irrep c its input is the n_c paths with output c, path-major ((n_c * mul) x c). The
        # components are reordered with a 0/1 matmul, not with slices: XLA:CPU fuses the slices'
        # transposes (pad chains) into the [E, ...] gather of the segment_sum backward and recomputes them
        # once per edge (2.5x slower layers at LiPS size).
        agg = jnp.einsum("nuk,kq->nuq", agg, jnp.asarray(sort_perm, dtype))
        grouped, off = {}, 0
        for ir, n_c in groups:
            grouped[ir] = agg[:, :, off : off + n_c * ir.dim].reshape(n_node, mul, n_c, ir.dim)
            off += n_c * ir.dim
        outs = []
        for o, (mul_o, ir_o) in enumerate(irreps_out):
            if ir_o not in grouped:
                outs.append(jnp.zeros((n_node, mul_o * ir_o.dim), dtype))
                continue
            xc = grouped[ir_o]  # [N, mul, n_c, d]
            n_c = xc.shape[2]
            wo = self.param(
                f"linear_2 w[{o}] {n_c * mul}x{ir_o},{mul_o}x{ir_o}", nn.initializers.normal(1.0), (n_c * mul, mul_o),
                jnp.float32,
            ).astype(dtype)  # e3nn layout: input index = path * mul + u
            y = jnp.einsum("nupi,puv->nvi", xc, wo.reshape(n_c, mul, mul_o)) * (1.0 / math.sqrt(n_c * mul))
            outs.append(y.reshape(n_node, mul_o * ir_o.dim))
        out = jnp.concatenate(outs, axis=-1)
        if self.use_sc:
            out = out + sc
        return out

    def _self_connection(self, x: e3nn.IrrepsArray, node_attrs: jax.Array) -> jax.Array:
        """e3nn FullyConnectedTensorProduct(x, one-hot species, irreps_out): weights [mul_in, S, mul_out]
        per (input chunk, output chunk) of the same irrep ("uvw"), normalised by 1/sqrt(fan_in) with
        fan_in = sum over the output's inputs of mul_in * S. Computed as (x (x) one-hot) @ W."""
        irreps_out = e3nn.Irreps(self.irreps_out)
        n_node, dtype, n_s = x.shape[0], x.dtype, node_attrs.shape[-1]
        outs = []
        for o, (mul_o, ir_o) in enumerate(irreps_out):
            ins = [
                (i, mul_i, sl) for i, ((mul_i, ir_i), sl) in enumerate(zip(x.irreps, x.irreps.slices())) if ir_i == ir_o
            ]
            if not ins:
                outs.append(jnp.zeros((n_node, mul_o * ir_o.dim), dtype))
                continue
            fan_in = sum(mul_i * n_s for _, mul_i, _ in ins)
            y = 0.0
            for i, mul_i, sl in ins:
                w = self.param(f"sc w[{i},{o}] {mul_i}x{ir_o},{mul_o}x{ir_o}", nn.initializers.normal(1.0),
                               (mul_i, n_s, mul_o), jnp.float32).astype(dtype)
                xi = x.array[:, sl].reshape(n_node, mul_i, 1, ir_o.dim) * node_attrs[:, None, :, None]
                xi = xi.reshape(n_node, mul_i * n_s, ir_o.dim)
                y = y + jnp.einsum("nki,kv->nvi", xi, w.reshape(mul_i * n_s, mul_o))
            outs.append((y * (1.0 / math.sqrt(fan_in))).reshape(n_node, mul_o * ir_o.dim))
        return jnp.concatenate(outs, axis=-1)


class NequIP(nn.Module):
    num_species: int
    avg_num_neighbors: float
    r_max: float
    num_layers: int = 3
    l_max: int = 1
    num_features: int = 16
    parity: bool = True
    num_basis: int = 8
    bessel_trainable: bool = True
    polynomial_p: float = 6.0
    invariant_layers: int = 2
    invariant_neurons: int = 64
    nonlinearity_scalars: tuple = ("silu", "tanh")  # (even, odd)
    nonlinearity_gates: tuple = ("silu", "tanh")
    resnet: bool = False
    use_sc: bool = True

    def irreps(self):
        """(irreps_sh, hidden, [per-layer (irreps_in, gate_plan, conv_irreps_out, layer_out, resnet)])."""
        p_sh = -1 if self.parity else 1
        irreps_sh = e3nn.Irreps.spherical_harmonics(self.l_max, p=p_sh)
        parities = (1, -1) if self.parity else (1,)
        hidden = e3nn.Irreps([(self.num_features, (l, p)) for p in parities for l in range(self.l_max + 1)])
        layers = []
        irreps = e3nn.Irreps(f"{self.num_features}x0e")
        for _ in range(self.num_layers):
            gate_plan, conv_out, layer_out = _conv_irreps(irreps, irreps_sh, hidden)
            layers.append((irreps, gate_plan, conv_out, layer_out, self.resnet and layer_out == irreps))
            irreps = layer_out
        return irreps_sh, hidden, layers

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, edge_mask, node_mask):
        dtype = vectors.dtype
        n_node = species.shape[0]
        acts_s = {1: self.nonlinearity_scalars[0], -1: self.nonlinearity_scalars[1]}
        acts_g = {1: self.nonlinearity_gates[0], -1: self.nonlinearity_gates[1]}
        irreps_sh, _, layers = self.irreps()

        # -- encode --
        node_attrs = jax.nn.one_hot(species, self.num_species, dtype=dtype)
        sh = e3nn.spherical_harmonics(
            e3nn.Irreps.spherical_harmonics(self.l_max), e3nn.IrrepsArray("1o", vectors), normalize=True,
            normalization="component",
        )
        sh = e3nn.IrrepsArray(irreps_sh, sh.array)  # relabel parity for parity=False (same numbers)
        r = jnp.sqrt(jnp.sum(vectors**2, axis=-1))
        # nequip's BesselBasis has prefactor 2/r_max; the shared block has sqrt(2/r_max).
        basis = BesselBasis(self.r_max, self.num_basis, self.bessel_trainable, name="radial_basis")(r)
        basis = basis * np.sqrt(2.0 / self.r_max).astype(dtype)
        cutoff = polynomial_cutoff(r, self.r_max, self.polynomial_p)
        cutoff = jnp.where(edge_mask, cutoff, 0.0).astype(dtype)
        edge_embedding = basis * cutoff[:, None]

        # -- embed --
        x = e3nn.flax.Linear(f"{self.num_features}x0e", name="chemical_embedding")(
            e3nn.IrrepsArray(f"{self.num_species}x0e", node_attrs)
        )

        # -- interaction layers --
        for i, (irreps_in, gate_plan, conv_out, layer_out, resnet) in enumerate(layers):
            assert x.irreps == irreps_in, (x.irreps, irreps_in)
            h = InteractionBlock(
                irreps_in=str(irreps_in), irreps_out=str(conv_out), irreps_sh=str(irreps_sh),
                num_species=self.num_species, avg_num_neighbors=float(self.avg_num_neighbors),
                invariant_layers=self.invariant_layers, invariant_neurons=self.invariant_neurons,
                radial_act=self.nonlinearity_scalars[0], use_sc=self.use_sc, name=f"layer{i}_convnet",
            )(x, species, sh.array, edge_embedding, senders, receivers)
            h = _gate(h, gate_plan, acts_s, acts_g)
            h = e3nn.IrrepsArray(layer_out, h)  # layout scalars | gated == layer_out (simplified)
            x = x + h if resnet else h

        # -- output --
        x = e3nn.flax.Linear(f"{max(1, self.num_features // 2)}x0e", name="conv_to_output_hidden")(x)
        e = e3nn.flax.Linear("1x0e", name="output_hidden_to_scalar")(x).array[:, 0]
        return jnp.where(node_mask, e, 0.0)


def _acts(v, default):
    if v is None:
        return default
    if isinstance(v, dict):
        return (v.get("e", default[0]), v.get("o", default[1]))
    return tuple(v)


@register("nequip")
def build_nequip(num_species: int, avg_num_neighbors: float, **hp) -> nn.Module:
    hp = dict(hp)
    hp["nonlinearity_scalars"] = _acts(hp.get("nonlinearity_scalars"), ("silu", "tanh"))
    hp["nonlinearity_gates"] = _acts(hp.get("nonlinearity_gates"), ("silu", "tanh"))
    nonlin_type = hp.pop("nonlinearity_type", "gate")
    if nonlin_type != "gate":
        raise ValueError(f"nequip: only nonlinearity_type 'gate' is implemented, got {nonlin_type!r}")
    for k in ("polynomial_p", "r_max"):
        if k in hp:
            hp[k] = float(hp[k])
    return NequIP(num_species=num_species, avg_num_neighbors=float(avg_num_neighbors), **hp)
