"""Architecture-specific tests for NequIP and Allegro (the shared physics tests are in test_models.py).

Fast: small hand-made graphs, no data mirror. The reference numbers (irreps, parameter counts) are
those of nequip 0.6.2 / allegro 0.2 built with the same hyperparameters.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench.models import build_module
from jaxbench.models.allegro import _contraction, allegro_irreps
from jaxbench.potential import model_cards

jax.config.update("jax_enable_x64", True)


def _hp(card: str) -> dict:
    return dict(model_cards()[card]["hyperparameters"])


def _graph(n_atoms=7, r_max=5.0, seed=0, extra_far=0, n_pad=5):
    """Random cluster: all ordered pairs within r_max, then `extra_far` pairs beyond r_max (as a
    neighbour list with a skin would hold), then `n_pad` masked padding edges on a padding node."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0.0, 4.5, size=(n_atoms, 3))
    pairs = [
        (i, j) for i in range(n_atoms) for j in range(n_atoms) if i != j and np.linalg.norm(pos[j] - pos[i]) < r_max
    ]
    pos_all, far = pos, []
    if extra_far:  # one more real atom, beyond r_max of every other one, yet listed as atom 0's neighbour
        pos_all = np.concatenate([pos, pos.max(axis=0, keepdims=True) + r_max + 0.5])
        far = [(0, n_atoms), (n_atoms, 0)]
    n_real = len(pos_all)
    recv = [p[0] for p in pairs + far] + [n_real] * n_pad
    send = [p[1] for p in pairs + far] + [n_real] * n_pad
    pos_all = np.concatenate([pos_all, np.zeros((1, 3))])
    vec = pos_all[send] - pos_all[recv]
    edge_mask = np.arange(len(recv)) < len(pairs) + len(far)
    vec[~edge_mask] = [0.0, 0.0, 2 * r_max]
    species = np.concatenate([rng.integers(0, 3, n_real), [0]])
    node_mask = np.arange(n_real + 1) < n_real
    return dict(
        vectors=jnp.asarray(vec), species=jnp.asarray(species, jnp.int32), senders=jnp.asarray(send, jnp.int32),
        receivers=jnp.asarray(recv, jnp.int32), edge_mask=jnp.asarray(edge_mask), node_mask=jnp.asarray(node_mask),
    )


def _apply(module, params, g):
    return module.apply(
        params, g["vectors"], g["species"], g["senders"], g["receivers"], g["edge_mask"], g["node_mask"]
    )


def _init(module, g):
    params = module.init(
        jax.random.PRNGKey(0), g["vectors"], g["species"], g["senders"], g["receivers"], g["edge_mask"], g["node_mask"]
    )
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [(x + 0.1 * jax.random.normal(k, x.shape)).astype(jnp.float64) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


# ---------------------------------------------------------------------------------------------
# NequIP
# ---------------------------------------------------------------------------------------------
def test_nequip_irreps_match_nequip_062():
    """Per-layer irreps as nequip 0.6.2 prints them for the small card (4 layers, F=4, l_max 2, parity)."""
    m = build_module("nequip", 3, 12.0, _hp("nequip-small"))
    sh, hidden, layers = m.irreps()
    assert str(sh) == "1x0e+1x1o+1x2e"
    assert str(hidden) == "4x0e+4x1e+4x2e+4x0o+4x1o+4x2o"
    expected = [  # (input, Gate.irreps_in = conv output, Gate.irreps_out, resnet)
        ("4x0e", "12x0e+4x1o+4x2e", "4x0e+4x2e+4x1o", False),
        ("4x0e+4x2e+4x1o", "20x0e+4x1o+4x1e+4x2o+4x2e", "4x0e+4x1e+4x2e+4x1o+4x2o", False),
        ("4x0e+4x1e+4x2e+4x1o+4x2o", "4x0o+20x0e+4x1o+4x1e+4x2o+4x2e", "4x0e+4x0o+4x1e+4x2e+4x1o+4x2o", False),
        ("4x0e+4x0o+4x1e+4x2e+4x1o+4x2o", "4x0o+20x0e+4x1o+4x1e+4x2o+4x2e", "4x0e+4x0o+4x1e+4x2e+4x1o+4x2o", True),
    ]
    got = [(str(a), str(c), str(o), r) for a, _, c, o, r in layers]
    assert got == expected


def test_nequip_small_card_keeps_every_code_path():
    m = build_module("nequip", 3, 12.0, _hp("nequip-small"))
    _, _, layers = m.irreps()
    plans = [p for _, p, _, _, _ in layers]
    kinds = {(k, ir.p) for plan in plans for k, _, _, ir in plan if k != "gated"}
    assert ("scalar", 1) in kinds and ("scalar", -1) in kinds and ("gate", 1) in kinds  # silu and tanh scalars
    assert any(r for *_, r in layers) and m.use_sc


@pytest.mark.parametrize("card,expected", [("nequip", 709_240), ("allegro", 8_152_968)])
def test_full_card_parameter_counts(card, expected):
    """nequip 0.6.2 EnergyModel: 709,240 and allegro 0.2: 8,152,968 (3 species, scale/shift not trainable)."""
    hp = _hp(card)
    m = build_module(card, 3, 10.0, hp)
    g = _graph(r_max=hp["r_max"])
    shapes = jax.eval_shape(
        m.init, jax.random.PRNGKey(0), g["vectors"], g["species"], g["senders"], g["receivers"], g["edge_mask"],
        g["node_mask"],
    )
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected


# ---------------------------------------------------------------------------------------------
# Allegro
# ---------------------------------------------------------------------------------------------
def test_allegro_tensor_track_irreps():
    sh, env, tps = allegro_irreps(2, "o3_full", 2)
    assert str(sh) == "1x0e+1x1o+1x2e"
    assert [[str(i) for i in t] for t in tps] == [["0e", "1o", "2e"], ["0e", "1o", "2e"], ["0e"]]
    paths, w3j, n_scalar, n_per_out = _contraction(("0e", "1o", "2e"), ("0e", "1o", "2e"), ("0e", "1o", "2e"))
    assert len(paths) == 11 and n_scalar == 3 and n_per_out == [3, 4, 4]
    _, _, n_scalar, n_per_out = _contraction(("0e", "1o", "2e"), ("0e", "1o", "2e"), ("0e",))
    assert n_scalar == 3 and n_per_out == [3]
    # the 1e and 2o irreps of the first TP cannot reach the final scalars and are pruned
    _, _, tps3 = allegro_irreps(2, "o3_full", 3)
    assert [str(i) for i in tps3[1]] == ["0e", "1e", "1o", "2e", "2o"]


# ---------------------------------------------------------------------------------------------
# Both: masking and the cutoff
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("card", [pytest.param("nequip-small", marks=pytest.mark.slow), "allegro-small"])
def test_padding_and_far_edges_do_not_contribute(card):
    """Masked edges (whatever their vector) and listed pairs beyond r_max change nothing."""
    hp = _hp(card)
    m = build_module(model_cards()[card]["architecture"], 3, 12.0, hp)
    g = _graph(r_max=hp["r_max"], extra_far=1, n_pad=3)
    params = _init(m, g)

    # one compilation: atom energies and the gradient of their sum, for graphs of one shape
    @jax.jit
    def energies_and_grad(g):
        def total(v):
            e = m.apply(params, v, g["species"], g["senders"], g["receivers"], g["edge_mask"], g["node_mask"])
            return jnp.sum(e), e

        (_, e), grad = jax.value_and_grad(total, has_aux=True)(g["vectors"])
        return e, grad

    e, grad = energies_and_grad(g)
    assert np.all(np.isfinite(np.asarray(e))) and float(jnp.abs(e).max()) > 0
    # padding edges pointing anywhere, even inside the cutoff
    vec = np.asarray(g["vectors"]).copy()
    vec[~np.asarray(g["edge_mask"])] = [0.3, -1.1, 0.7]
    np.testing.assert_allclose(energies_and_grad({**g, "vectors": jnp.asarray(vec)})[0], e, rtol=0, atol=1e-12)
    # the listed pairs beyond r_max taken out of the list (made padding edges, so the shape stays): no atom
    # energy changes
    far = np.asarray(jnp.linalg.norm(g["vectors"], axis=-1) >= hp["r_max"]) & np.asarray(g["edge_mask"])
    assert far.sum() == 2
    pad_node = int(np.flatnonzero(~np.asarray(g["node_mask"]))[0])
    g3 = {**g, "edge_mask": jnp.asarray(np.asarray(g["edge_mask"]) & ~far),
          "senders": jnp.where(far, pad_node, g["senders"]), "receivers": jnp.where(far, pad_node, g["receivers"])}
    np.testing.assert_allclose(energies_and_grad(g3)[0], e, rtol=0, atol=1e-12)
    # forces through the masked / far edges are finite and zero
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(np.asarray(grad)[far | ~np.asarray(g["edge_mask"])], 0.0, atol=1e-12)


# nequip-small's invariance is also in tests/test_models.py (every card): slow here
@pytest.mark.parametrize("card", [pytest.param("nequip-small", marks=pytest.mark.slow), "allegro-small"])
def test_rotation_reflection_of_edge_vectors(card):
    hp = _hp(card)
    m = build_module(model_cards()[card]["architecture"], 3, 12.0, hp)
    g = _graph(r_max=hp["r_max"], seed=3)
    params = _init(m, g)
    e = _apply(m, params, g)
    R = np.asarray(e3nn.rand_matrix(jax.random.PRNGKey(5), (), dtype=jnp.float64)) @ np.diag([1.0, 1.0, -1.0])
    mask = np.asarray(g["edge_mask"])[:, None]
    vec = np.where(mask, np.asarray(g["vectors"]) @ R.T, np.asarray(g["vectors"]))
    np.testing.assert_allclose(_apply(m, params, {**g, "vectors": jnp.asarray(vec)}), e, rtol=0, atol=1e-10)


def test_allegro_resnet_update_ratios():
    hp = dict(_hp("allegro-small"), latent_resnet_update_ratios=[0.3, 0.6])
    m = build_module("allegro", 3, 12.0, hp)
    g = _graph(r_max=hp["r_max"], seed=1)
    params = _init(m, g)
    e1 = _apply(m, params, g)
    e2 = _apply(build_module("allegro", 3, 12.0, _hp("allegro-small")), params, g)
    assert float(jnp.abs(e1 - e2).max()) > 1e-8  # the ratios matter
    with pytest.raises(ValueError):
        bad = build_module("allegro", 3, 12.0, dict(_hp("allegro-small"), latent_resnet_update_ratios=[0.3]))
        _apply(bad, params, g)
