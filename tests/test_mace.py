"""MACE / BOTNet specific tests (the shared physics tests live in tests/test_models.py)."""

from __future__ import annotations

import itertools
import math

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench.models import build_module
from jaxbench.models.mace import SpeciesLinear, SymmetricContraction, _product_basis

jax.config.update("jax_enable_x64", True)

IRREPS_IN = "0e+1o+2e"


def _contraction(correlation, irreps_out="0e+1o+2e", num_species=3, channels=4, n=5, seed=0):
    x = e3nn.normal(IRREPS_IN, jax.random.PRNGKey(seed), (n, channels)).astype(jnp.float64)
    species = jnp.arange(n) % num_species
    onehot = jax.nn.one_hot(species, num_species, dtype=jnp.float64)
    mod = SymmetricContraction(irreps_out, correlation, num_species)
    params = mod.init(jax.random.PRNGKey(1), x, onehot)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    return mod, params, x, species, onehot


@pytest.mark.parametrize("correlation, irreps_out, n", [(1, "0e+1o+2e", 5), (2, "0e+1o+2e", 5), (3, "0e+1o+2e", 5),
                                                      (3, "0e+1o+2e", 11), (2, "0e", 11), (3, "0e", 5)])
def test_symmetric_contraction_matches_full_basis(correlation, irreps_out, n):
    """Both evaluations (dense over all monomials, in blocks of 8 atoms with the last block padded:
    n = 11; sparse over the used terms: scalar outputs) equal the plain contraction with the full U
    tensors."""
    from jaxbench.models.mace import _sparse_terms

    mod, params, x, species, onehot = _contraction(correlation, irreps_out=irreps_out, n=n)
    n_mono = sum(math.comb(9 + nu - 1, nu) for nu in range(1, correlation + 1))
    sparse = 4 * len(_sparse_terms(IRREPS_IN, irreps_out, correlation)[1]) <= n_mono
    assert sparse == (irreps_out == "0e")  # both paths are exercised
    out = mod.apply(params, x, onehot)
    a = np.asarray(x.array)  # [n, c, 9]
    ref = np.zeros(out.shape)
    for nu in range(1, correlation + 1):
        U = e3nn.reduced_symmetric_tensor_product_basis(e3nn.Irreps(IRREPS_IN), nu, keep_ir=irreps_out.split("+"))
        for (k, ir), u in zip(U.irreps, U.chunks):
            u = np.asarray(u) / nu  # [9]*nu + [k, ir.dim]
            t = np.einsum("nca,a...->nc...", a, u)
            for _ in range(nu - 1):
                t = np.einsum("nca,nca...->nc...", a, t)
            w = np.asarray(params["params"][f"w{nu}_{ir}"])[np.asarray(species)] / np.sqrt(k)  # [n, k, c]
            off = {"0e": 0, "1o": 1, "2e": 4}[str(ir)]
            ref[:, :, off : off + ir.dim] += np.einsum("ncki,nkc->nci", t, w)
    np.testing.assert_allclose(np.asarray(out.array), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("correlation", [1, 2, 3])
def test_symmetric_contraction_equivariant_and_of_degree_correlation(correlation):
    mod, params, x, _, onehot = _contraction(correlation)
    R = np.asarray(e3nn.rand_matrix(jax.random.PRNGKey(3), (), dtype=jnp.float64))
    out = mod.apply(params, x, onehot)
    out_rot = mod.apply(params, x.transform_by_matrix(R), onehot)
    np.testing.assert_allclose(np.asarray(out_rot.array), np.asarray(out.transform_by_matrix(R).array), atol=1e-10)
    # A polynomial of degree `correlation` in x with no constant term: its (correlation+1)-th finite
    # difference in a scale factor t vanishes, the correlation-th does not.
    f = lambda t: np.asarray(mod.apply(params, x * t, onehot).array)  # noqa: E731
    ts = np.arange(correlation + 2) * 0.7
    vals = [f(t) for t in ts]
    diff = lambda k: sum((-1) ** (k - j) * float(math.comb(k, j)) * vals[j] for j in range(k + 1))  # noqa: E731
    assert np.abs(diff(correlation + 1)).max() < 1e-9 * np.abs(vals[-1]).max()
    assert np.abs(diff(correlation)).max() > 1e-3 * np.abs(vals[-1]).max()
    np.testing.assert_allclose(vals[0], 0.0, atol=1e-14)


def test_species_linear_is_fctp_with_one_hot():
    """skip_tp: FCTP(x, one-hot) with e3nn path normalisation 1/sqrt(mul_in * S)."""
    S, mul = 4, 3
    x = e3nn.normal(f"{mul}x0e+{mul}x1o", jax.random.PRNGKey(0), (6,)).astype(jnp.float64)
    species = jnp.array([0, 1, 2, 3, 1, 2])
    mod = SpeciesLinear(f"2x0e+2x1o", S)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), mod.init(jax.random.PRNGKey(1), species, x))
    out = mod.apply(params, species, x)
    w = {k.split()[0]: np.asarray(v) for k, v in params["params"]["linear"].items()}  # w[i,o]: [S, mul, 2]
    s = np.asarray(species)
    ref0 = np.einsum("nu,nuv->nv", np.asarray(x.filter("0e").array), w["w[0,0]"][s]) / np.sqrt(mul * S)
    ref1 = np.einsum("nui,nuv->nvi", np.asarray(x.filter("1o").array).reshape(6, mul, 3), w["w[1,1]"][s]) / np.sqrt(mul * S)
    np.testing.assert_allclose(np.asarray(out.filter("0e").array), ref0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(out.filter("1o").array).reshape(6, 2, 3), ref1, atol=1e-12)


def test_builders_validate_hyperparameters():
    with pytest.raises(ValueError, match="correlation"):
        build_module("botnet", 3, 10.0, {"r_max": 5.0, "correlation": 2})
    with pytest.raises(TypeError):
        build_module("mace", 3, 10.0, {"r_max": 5.0, "num_layers": 2})  # a typo'd key is not ignored
    with pytest.raises(ValueError, match="gate"):
        build_module("mace", 3, 10.0, {"r_max": 5.0, "gate": "relu6"})


def _tiny_graph(n=4, seed=0):
    rng = np.random.default_rng(seed)
    pos = rng.normal(size=(n, 3)) * 1.5
    pairs = [(i, j) for i, j in itertools.product(range(n), repeat=2) if i != j]
    recv = np.array([p[0] for p in pairs] + [n] * 3, np.int32)  # 3 padding edges on padding node n
    send = np.array([p[1] for p in pairs] + [n] * 3, np.int32)
    vec = np.zeros((len(recv), 3))
    vec[: len(pairs)] = pos[send[: len(pairs)]] - pos[recv[: len(pairs)]]
    vec[len(pairs) :] = [0.0, 0.0, 10.0]
    species = np.array(list(rng.integers(0, 3, n)) + [0], np.int32)
    edge_mask = np.arange(len(recv)) < len(pairs)
    node_mask = np.arange(n + 1) < n
    return vec, species, send, recv, edge_mask, node_mask


@pytest.mark.parametrize("arch,hp", [
    ("mace", {"hidden_irreps": "4x0e+4x1o", "max_ell": 2, "correlation": 3, "num_interactions": 3, "radial_mlp": [8]}),
    pytest.param("botnet", {"hidden_irreps": "4x0e+4x1o+4x2e", "max_ell": 3, "num_interactions": 3, "radial_mlp": [8]},
                 marks=pytest.mark.slow),  # shares MACE's interaction code; padding of every card: test_models
])
def test_padding_edges_do_not_contribute_and_output_is_per_atom(arch, hp):
    module = build_module(arch, 3, 4.0, {"r_max": 5.0, **hp})
    vec, species, send, recv, em, nm = _tiny_graph()
    params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.asarray(vec), species, send, recv, em, nm)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    apply = jax.jit(module.apply)  # op-by-op, a three-layer model takes most of a minute
    e = apply(params, jnp.asarray(vec), species, send, recv, em, nm)
    assert e.shape == (5,) and e[-1] == 0.0 and np.all(np.isfinite(e))
    # Moving the padding edges (any length, even inside the cutoff) changes nothing: they are masked.
    vec2 = vec.copy()
    vec2[~em] = [0.5, 0.3, 1.0]
    e2 = apply(params, jnp.asarray(vec2), species, send, recv, em, nm)
    np.testing.assert_allclose(np.asarray(e2), np.asarray(e), atol=1e-13)
    # float32 parameters and inputs give float32 energies.
    p32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    e32 = apply(p32, jnp.asarray(vec, jnp.float32), species, send, recv, em, nm)
    assert e32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(e32), np.asarray(e), rtol=1e-3, atol=1e-4 * np.abs(e).max())


@pytest.mark.parametrize("irreps_in,target", [("4x0e", "4x0e+4x1o+4x2e+4x3o"), ("4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e+4x3o"), ("4x0e+4x1o", "3x0e+2x1o")])
@pytest.mark.parametrize("edge_block", [32, 5])
def test_convolution_equals_e3nn_tensor_product(irreps_in, target, edge_block):
    """The channel-minor convolution == e3nn.tensor_product(h_j, Y_ij) with per-(path, channel) weights,
    summed over neighbours, e3nn-normalised linear per output irrep, / avg_num_neighbors; edges in
    one block, and in several blocks with a padded last one (edge_block 5)."""
    from jaxbench.models.mace import Convolution, RadialMLP

    vec, _, send, recv, em, _ = _tiny_graph(n=5)
    n, E = 6, len(send)
    n_blocks = -(-E // edge_block)
    assert (n_blocks == 1) == (edge_block == 32) and (edge_block == 32 or n_blocks * -(-E // n_blocks) > E)
    h = e3nn.normal(irreps_in, jax.random.PRNGKey(0), (n,)).astype(jnp.float64)
    sh = e3nn.spherical_harmonics("0e+1o+2e+3o", e3nn.IrrepsArray("1o", jnp.asarray(vec)), True, "component")
    feats = jax.random.normal(jax.random.PRNGKey(1), (E, 8), jnp.float64)
    mod = Convolution(target, 3.0, (8,), edge_block=edge_block)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), mod.init(jax.random.PRNGKey(2), h, sh, feats, em, send, recv))
    out = mod.apply(params, h, sh, feats, em, send, recv)

    p = params["params"]
    hu = e3nn.flax.Linear(h.irreps).apply({"params": p["linear_up"]}, h)
    C = hu.irreps[0].mul
    # e3nn sorts the output irreps of a tensor product: take the (ir1, ir2) pairs one at a time to
    # recover mace-torch's path order (input chunk, SH chunk, ir3).
    hs = hu[send]
    chunks = []
    for sl1 in hs.irreps.slices():
        for sl2 in sh.irreps.slices():
            t = e3nn.tensor_product(hs.slice_by_dim[sl1], sh.slice_by_dim[sl2], filter_ir_out=e3nn.Irreps(target))
            chunks += list(zip(t.irreps, t.chunks))
    w = RadialMLP((8, len(chunks) * C)).apply({"params": p["conv_tp_weights"]}, feats)
    w = np.where(np.asarray(em)[:, None], np.asarray(w), 0.0).reshape(E, -1, C)
    per_ir = {}
    for i, ((mul, ir), c) in enumerate(chunks):
        m = np.asarray(c) * w[:, i, :, None]  # [E, C, d]
        per_ir.setdefault(ir, []).append(np.stack([np.bincount(recv, weights=m[:, u, k], minlength=n) for u in range(C) for k in range(ir.dim)], 1).reshape(n, C, ir.dim))
    ref = []
    for mul_out, ir in e3nn.Irreps(target):
        if ir not in per_ir:
            continue
        msg = np.concatenate(per_ir[ir], axis=1)  # [n, paths*C, d]
        W = np.asarray(p[f"linear_{ir}"])
        ref.append((np.einsum("nqd,qo->nod", msg, W) / np.sqrt(msg.shape[1]) / 3.0).reshape(n, -1))
    np.testing.assert_allclose(np.asarray(out.array), np.concatenate(ref, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", [pytest.param("mace", marks=pytest.mark.slow), "botnet"])  # full mace card: 100 s
def test_force_loss_gradient_matches_finite_differences(arch):
    """Training differentiates forces w.r.t. parameters (second order through the model)."""
    hp = {"r_max": 5.0, "hidden_irreps": "3x0e+3x1o", "max_ell": 2, "num_interactions": 2, "radial_mlp": [8]}
    if arch == "mace":
        hp["correlation"] = 2
    module = build_module(arch, 3, 4.0, hp)
    vec, species, send, recv, em, nm = _tiny_graph(seed=1)
    vec = jnp.asarray(vec)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), module.init(jax.random.PRNGKey(0), vec, species, send, recv, em, nm))
    energy = lambda p, v: jnp.sum(module.apply(p, v, species, send, recv, em, nm))  # noqa: E731
    loss = jax.jit(lambda p: jnp.sum(jax.grad(energy, 1)(p, vec) ** 2))
    grads = jax.jit(jax.grad(loss))(params)  # compiled: op-by-op, second order through the model takes a minute
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    direction = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    h = 1e-5
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * h * d, params, direction)  # noqa: E731
    fd = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * h)
    analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    assert abs(float(analytic)) > 1e-8
    np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6)
