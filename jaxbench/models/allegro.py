"""Allegro (Musaelian et al. 2023, Nat. Commun. 14, 579) in Flax + e3nn-jax.

A port of mir-group/allegro 0.2.x (`allegro.model.Allegro` / `allegro.nn.Allegro_Module` with
`embed_initial_edge` and `latent_resnet_update_ratios`: the code of the paper and of EGraFFBench, whose
Table 12 sets `embed_initial_edge`; allegro >= 0.3 / nequip-allegro is a different architecture).
Strictly local: every feature lives on an ordered pair (edge) ij, with i the centre (our `receivers`)
and j the neighbour (`senders`), D = r_j - r_i. Every parameter has allegro 0.2's shape.

    allegro 0.2.x                               here
    ------------------------------------------  -----------------------------------------------------
    OneHotAtomEncoding                           `jax.nn.one_hot(species)`
    RadialBasisEdgeEncoding(NormalizedBasis(     nequip `BesselBasis` (trainable, prefactor 2/r_max),
      BesselBasis), PolynomialCutoff(p))           standardised by mean/std over r ~ U(0, r_max] (4000
                                                   samples, frozen at init; `norm_basis_mean_shift`),
                                                   times `polynomial_cutoff(r, r_max, p)`
    SphericalHarmonicEdgeAttrs (component, norm)  `e3nn.spherical_harmonics(..., normalize=True)`
    Allegro_Module                               `Allegro.__call__`:
      two_body_latent ScalarMLP(cat(onehot_i,      `ScalarMLP` (no bias, U(-sqrt3, sqrt3) weights,
        onehot_j, edge_embedding))                  x norm/sqrt(fan_in), normalised SiLU between layers)
      latents * cutoff(r_ij) (every layer)        same
      latent resnet: a * latents + b * new,       same: b / a = sigmoid(p) (p = logit(update ratio), 0 by
        a^2 + b^2 = 1                               default: ratio 0.5), not learnable by default
      env_embed_mlps (linear by default)          `ScalarMLP`
      MakeWeightedChannels(edge SH, w)            `_weighted_channels` (one weight per channel & irrep)
      layer 0: features = weighted SH (embed_     same
        initial_edge)
      local env = scatter(weighted SH, centre)    `segment_sum(..., receivers)` / sqrt(avg_num_neighbors)
        * rsqrt(avg_num_neighbors), then [centre]    then gathered back to the edges
      Contracter (uuu, no weights, component CG)  outer product per channel + one matmul with the stacked
                                                   Clebsch-Gordan matrix of all paths
      scalars = the 0e paths, before the linear   same ([E, mul * n_scalar_paths], mul-major)
      strided Linear (per-path [mul, mul] mixes,  `StridedLinear` (same weights and 1/sqrt(n * mul));
        1/sqrt(n_paths * mul))                     the last layer's output is unused (as in allegro)
      final_latent on cat(latents, scalars)       same
    edge_eng ScalarMLP([128] -> 1, no nonlin.)   `ScalarMLP`
    EdgewiseEnergySum (sum over edges at the     `segment_sum(edge_energy, receivers)` / sqrt(avg_num_nb)
      centre, x 1/sqrt(avg_num_neighbors))
    PerSpeciesRescale / RescaleEnergyEtc         in `jaxbench.potential.Potential`, not here

The reference gathers only the "active" edges (cutoff > 0); here every edge slot is computed and
edges at or beyond r_max (or padding) carry zero latents, hence zero weights and zero energy, which
is the same function.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import register
from .blocks import BesselBasis, polynomial_cutoff, safe_norm

_ACTS = {"silu": jax.nn.silu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}
_NP_ACTS = {
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3))),
}


# e3nn-torch's `normalize2mom(f).cst` (Monte-Carlo, 1e6 samples, seed 0), as allegro uses it.
_E3NN_TORCH_CONSTANTS = {"silu": 1.6791767923989418, "tanh": 1.5937334472592695}


@functools.lru_cache(maxsize=None)
def _second_moment_constant(name: str) -> float:
    """e3nn `normalize2mom`: 1 / sqrt(E_{z~N(0,1)} f(z)^2): e3nn-torch's value, else by quadrature."""
    if name in _E3NN_TORCH_CONSTANTS:
        return _E3NN_TORCH_CONSTANTS[name]
    x, w = np.polynomial.hermite_e.hermegauss(200)
    w = w / w.sum()
    return float(1.0 / np.sqrt(np.sum(w * _NP_ACTS[name](x) ** 2)))


def _uniform_unit_variance(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -math.sqrt(3.0), math.sqrt(3.0))


class ScalarMLP(nn.Module):
    """allegro 0.2 `ScalarMLPFunction`: bias-free, weights of unit variance, each layer scaled by
    norm_from_last / sqrt(fan_in), the nonlinearity (normalised to unit second moment) between layers
    and not after the last."""

    features: Sequence[int]
    nonlinearity: Optional[str] = "silu"

    @nn.compact
    def __call__(self, x):
        norm_from_last = 1.0
        n = len(self.features)
        for i, h in enumerate(self.features):
            w = self.param(f"w{i}", _uniform_unit_variance, (x.shape[-1], h)).astype(x.dtype)
            x = x @ (w * (norm_from_last / math.sqrt(x.shape[-1])))
            if self.nonlinearity is not None and i < n - 1:
                x = _ACTS[self.nonlinearity](x)
                norm_from_last = _second_moment_constant(self.nonlinearity)
        return x


# ---------------------------------------------------------------------------------------------
# Static irreps bookkeeping (Allegro_Module.__init__)
# ---------------------------------------------------------------------------------------------
def _path_exists(arg, env, ir_out) -> bool:
    return any(ir_out in a * e for a in arg for e in env)


def allegro_irreps(l_max: int, parity: str, num_layers: int):
    """(edge SH irreps, [irreps of the tensor track entering each layer ..., final (0e)])."""
    if parity not in ("o3_full", "o3_restricted", "so3"):
        raise ValueError(f"allegro: parity must be o3_full, o3_restricted or so3, got {parity!r}")
    sh = e3nn.Irreps.spherical_harmonics(l_max, p=(1 if parity == "so3" else -1))
    env = [ir for _, ir in sh]
    include_parity = parity == "o3_full"
    arg = list(env)
    tps = [arg]
    ir_out = None
    for layer_idx in range(num_layers):
        if layer_idx == 0:
            ir_out = []
            for ir in env:
                if include_parity:
                    ir_out += [e3nn.Irrep(ir.l, 1), e3nn.Irrep(ir.l, -1)]
                else:
                    ir_out.append(ir)
        if layer_idx == num_layers - 1:
            ir_out = [e3nn.Irrep("0e")]
        ir_out = [ir for ir in ir_out if _path_exists(arg, env, ir)]
        arg = ir_out
        tps.append(ir_out)
    # remove paths that cannot reach the final scalars
    out = tps[-1]
    new = [out]
    for arg in reversed(tps[:-1]):
        arg = [a for a in arg if any(any(i in out for i in a * e) for e in env)]
        new.append(arg)
        out = arg
    tps = list(reversed(new))
    assert tps[-1] == [e3nn.Irrep("0e")]
    return sh, env, tps


def _dims(irs):
    offs, o = [], 0
    for ir in irs:
        offs.append(o)
        o += ir.dim
    return offs, o


@functools.lru_cache(maxsize=None)
def _contraction(arg: tuple, env: tuple, out: tuple):
    """Paths (i_out-major as Allegro), the stacked CG matrix [d_arg * d_env, D_paths] (component
    normalisation, e3nn-jax basis), the number of leading 0e paths, and per-output path counts."""
    arg = [e3nn.Irrep(a) for a in arg]
    env = [e3nn.Irrep(e) for e in env]
    out = [e3nn.Irrep(o) for o in out]
    a_off, d_arg = _dims(arg)
    e_off, d_env = _dims(env)
    paths = []
    for i_out, ir_out in enumerate(out):
        for i1, ir1 in enumerate(arg):
            for i2, ir2 in enumerate(env):
                if ir_out in ir1 * ir2:
                    paths.append((i1, i2, i_out))
    d_paths = sum(out[p[2]].dim for p in paths)
    w3j = np.zeros((d_arg, d_env, d_paths))
    k = 0
    for i1, i2, i_out in paths:
        l1, l2, lo = arg[i1].l, env[i2].l, out[i_out].l
        cg = e3nn.clebsch_gordan(l1, l2, lo) * math.sqrt(2 * lo + 1)
        w3j[a_off[i1] : a_off[i1] + 2 * l1 + 1, e_off[i2] : e_off[i2] + 2 * l2 + 1, k : k + 2 * lo + 1] = cg
        k += 2 * lo + 1
    n_scalar = 0
    for p in paths:
        if out[p[2]] == e3nn.Irrep("0e"):
            n_scalar += 1
        else:
            break
    n_per_out = [sum(1 for p in paths if p[2] == i) for i in range(len(out))]
    return paths, w3j.reshape(d_arg * d_env, d_paths), n_scalar, n_per_out


def _weighted_channels(attr: jax.Array, w: jax.Array, rtoi: np.ndarray, mul: int) -> jax.Array:
    """MakeWeightedChannels: attr [E, D] (mul 1 per irrep), w [E, mul * R] -> [E, mul, D]."""
    w = w.reshape(w.shape[0], mul, -1)[:, :, rtoi]
    return w * attr[:, None, :]


class StridedLinear(nn.Module):
    """allegro `_strided.Linear` from the TP's path outputs [E, mul, D_paths] to [E, mul, dim(out)]."""

    out: tuple  # output irreps (strings)
    n_per_out: tuple
    mul: int

    @nn.compact
    def __call__(self, x):
        outs, off = [], 0
        for i, (ir, n) in enumerate(zip(self.out, self.n_per_out)):
            d = e3nn.Irrep(ir).dim
            w = self.param(f"w[{i}] {ir}", _uniform_unit_variance, (self.mul, self.mul, n)).astype(x.dtype)  # v u n
            chunk = x[:, :, off : off + n * d].reshape(x.shape[0], self.mul, n, d)
            outs.append(jnp.einsum("euni,vun->evi", chunk, w) * (1.0 / math.sqrt(n * self.mul)))
            off += n * d
        return jnp.concatenate(outs, axis=-1)


class Allegro(nn.Module):
    num_species: int
    avg_num_neighbors: float
    r_max: float
    num_layers: int = 2
    l_max: int = 2
    parity: str = "o3_full"
    env_embed_multiplicity: int = 32
    embed_initial_edge: bool = True
    num_basis: int = 8
    bessel_trainable: bool = True
    normalize_basis: bool = True
    norm_basis_mean_shift: bool = True
    polynomial_p: float = 6.0
    two_body_latent_mlp_latent_dimensions: tuple = (128, 256, 512, 1024)
    two_body_latent_mlp_nonlinearity: Optional[str] = "silu"
    latent_mlp_latent_dimensions: tuple = (1024, 1024, 1024)
    latent_mlp_nonlinearity: Optional[str] = "silu"
    latent_resnet: bool = True
    latent_resnet_update_ratios: Optional[tuple] = None  # one per layer, in (0, 1); default 0.5 each
    latent_resnet_update_ratios_learnable: bool = False
    env_embed_mlp_latent_dimensions: tuple = ()
    env_embed_mlp_nonlinearity: Optional[str] = None
    edge_eng_mlp_latent_dimensions: tuple = (128,)
    edge_eng_mlp_nonlinearity: Optional[str] = None

    def _basis_stats(self):
        """NormalizedBasis statistics of the initial Bessel basis over r ~ U(0, r_max] (n = 4000)."""
        n = 4000
        rs = np.linspace(0.0, self.r_max, n + 1)[1:]
        freqs = np.arange(1, self.num_basis + 1) * np.pi
        bs = (2.0 / self.r_max) * np.sin(freqs * rs[:, None] / self.r_max) / rs[:, None]
        if self.norm_basis_mean_shift:
            mean, std = bs.mean(axis=0), bs.std(axis=0, ddof=1)  # torch.std_mean is unbiased
        else:
            mean, std = np.zeros(self.num_basis), np.sqrt((bs**2).mean(axis=0))
        return mean, 1.0 / std

    @nn.compact
    def __call__(self, vectors, species, senders, receivers, edge_mask, node_mask):
        if not self.embed_initial_edge:
            raise NotImplementedError("allegro: only embed_initial_edge=True (the default) is implemented")
        dtype = vectors.dtype
        n_node, n_edge = species.shape[0], vectors.shape[0]
        mul = self.env_embed_multiplicity
        sh_irreps, env, tps = allegro_irreps(self.l_max, self.parity, self.num_layers)
        if tps[0] != env:
            raise NotImplementedError("allegro: the first tensor-product input must keep every SH irrep")
        rtoi = np.concatenate([np.full(ir.dim, i) for i, ir in enumerate(env)])
        n_irreps = len(env)

        # -- edge invariants and SH --
        r = safe_norm(vectors)
        sh = e3nn.spherical_harmonics(
            e3nn.Irreps.spherical_harmonics(self.l_max), e3nn.IrrepsArray("1o", vectors), normalize=True,
            normalization="component",
        ).array
        basis = BesselBasis(self.r_max, self.num_basis, self.bessel_trainable, name="radial_basis")(r)
        basis = basis * np.sqrt(2.0 / self.r_max).astype(dtype)  # nequip prefactor 2/r_max
        if self.normalize_basis:
            mean, inv_std = self._basis_stats()
            basis = (basis - mean.astype(dtype)) * inv_std.astype(dtype)
        cutoff = jnp.where(edge_mask, polynomial_cutoff(r, self.r_max, self.polynomial_p), 0.0).astype(dtype)
        edge_invariants = basis * cutoff[:, None]
        onehot = jax.nn.one_hot(species, self.num_species, dtype=dtype)

        # -- latent resnet: latents <- a * latents + b * new, b / a = sigmoid(param), a^2 + b^2 = 1 --
        if self.latent_resnet_update_ratios is None:
            ratio_params = np.zeros(self.num_layers)
        else:
            ratios = np.asarray(self.latent_resnet_update_ratios, dtype=np.float64)
            if ratios.shape != (self.num_layers,) or not np.all((ratios > 0) & (ratios < 1)):
                raise ValueError("allegro: latent_resnet_update_ratios needs num_layers values in (0, 1)")
            ratio_params = np.clip(np.log(ratios / (1.0 - ratios)), -6.0, 6.0)
        if self.latent_resnet_update_ratios_learnable:
            init = np.asarray(ratio_params, np.float32)
            ratio_params = self.param("latent_resnet_update_params", lambda key, shape: jnp.asarray(init), init.shape)
            ratio_params = ratio_params.astype(dtype)
        update = jax.nn.sigmoid(jnp.asarray(ratio_params, dtype))

        def resnet_update(layer_index, latents, new_latents):
            if self.latent_resnet and layer_index > 0:
                u = update[layer_index - 1]
                c_old = jax.lax.rsqrt(u * u + 1.0)
                return c_old * latents + (u * c_old) * new_latents
            return new_latents

        inv_sqrt_avg = 1.0 / math.sqrt(self.avg_num_neighbors)
        latent_inputs = [onehot[receivers], onehot[senders], edge_invariants]
        latents = None
        features = None
        for layer in range(self.num_layers):
            if layer == 0:
                mlp = ScalarMLP(
                    tuple(self.two_body_latent_mlp_latent_dimensions), self.two_body_latent_mlp_nonlinearity,
                    name="two_body_latent",
                )
            else:
                mlp = ScalarMLP(
                    tuple(self.latent_mlp_latent_dimensions), self.latent_mlp_nonlinearity, name=f"latent_{layer}"
                )
            new_latents = mlp(jnp.concatenate(latent_inputs, axis=-1)) * cutoff[:, None]
            latents = resnet_update(layer, latents, new_latents)

            n_w = n_irreps * mul * (2 if layer == 0 else 1)
            weights = ScalarMLP(
                tuple(self.env_embed_mlp_latent_dimensions) + (n_w,), self.env_embed_mlp_nonlinearity,
                name=f"env_embed_{layer}",
            )(latents)
            if layer == 0:
                features = _weighted_channels(sh, weights[:, : n_irreps * mul], rtoi, mul)  # [E, mul, D]
                weights = weights[:, n_irreps * mul :]
            # local environment of the centre atom, normalised, gathered back to its edges
            env_edge = _weighted_channels(sh, weights, rtoi, mul)
            local_env = jax.ops.segment_sum(env_edge, receivers, num_segments=n_node) * inv_sqrt_avg
            local_env = local_env[receivers]

            arg, out = tps[layer], tps[layer + 1]
            paths, w3j, n_scalar, n_per_out = _contraction(
                tuple(str(i) for i in arg), tuple(str(i) for i in env), tuple(str(i) for i in out)
            )
            if layer > 0:
                assert features.shape[-1] == sum(ir.dim for ir in arg)
            outer = features[:, :, :, None] * local_env[:, :, None, :]  # [E, mul, d_arg, d_env]
            tp = outer.reshape(n_edge, mul, -1) @ jnp.asarray(w3j, dtype)  # [E, mul, D_paths]
            scalars = tp[:, :, :n_scalar].reshape(n_edge, mul * n_scalar)
            linear = StridedLinear(tuple(str(i) for i in out), tuple(n_per_out), mul, name=f"linear_{layer}")
            if layer < self.num_layers - 1:
                features = linear(tp)
            else:
                # the reference also applies this linear, but its output is never used; create its
                # parameters (so that parameter counts match) without computing it
                linear(tp[:1])
            latent_inputs = [latents, scalars]

        new_latents = ScalarMLP(
            tuple(self.latent_mlp_latent_dimensions), self.latent_mlp_nonlinearity, name="final_latent"
        )(jnp.concatenate(latent_inputs, axis=-1)) * cutoff[:, None]
        latents = resnet_update(self.num_layers, latents, new_latents)

        edge_energy = ScalarMLP(
            tuple(self.edge_eng_mlp_latent_dimensions) + (1,), self.edge_eng_mlp_nonlinearity, name="edge_eng"
        )(latents)[:, 0]
        edge_energy = jnp.where(edge_mask, edge_energy, 0.0)
        atom_energy = jax.ops.segment_sum(edge_energy, receivers, num_segments=n_node) * inv_sqrt_avg
        return jnp.where(node_mask, atom_energy, 0.0)


@register("allegro")
def build_allegro(num_species: int, avg_num_neighbors: float, **hp) -> nn.Module:
    hp = dict(hp)
    for k in (
        "two_body_latent_mlp_latent_dimensions", "latent_mlp_latent_dimensions", "env_embed_mlp_latent_dimensions",
        "edge_eng_mlp_latent_dimensions", "latent_resnet_update_ratios",
    ):
        if hp.get(k) is not None:
            hp[k] = tuple(hp[k])
    for k in ("polynomial_p", "r_max"):
        if k in hp:
            hp[k] = float(hp[k])
    return Allegro(num_species=num_species, avg_num_neighbors=float(avg_num_neighbors), **hp)
