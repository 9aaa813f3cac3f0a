"""SchNet: basis functions against their closed forms, and the whole model against schnetpack 2.1.1.

The reference numbers below were produced by schnetpack 2.1.1 (torch 2.13, float64, basis buffers rebuilt
in float64) for the geometry and the deterministic weights defined here: `representation.SchNet(
n_atom_basis=6, n_interactions=2, GaussianRBF(5, 3.0), CosineCutoff(3.0), n_filters=4,
nuclear_embedding=nn.Embedding(3, 6))` + `atomistic.Atomwise(n_in=6, activation=shifted_softplus)`'s
outnet, every Dense weight W[out, in] = det(path + "/kernel", (in, out)).T and bias det(path + "/bias").
Atom 4 has no neighbour within the cutoff (an isolated atom: zero force).
Regenerate with `/work/refenv/bin/python benchmarks/ref_models/schnet.py` (reference venv with schnetpack).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench.models import build_module
from jaxbench.models.schnet import cosine_cutoff, gaussian_rbf, shifted_softplus

jax.config.update("jax_enable_x64", True)

R_MAX = 3.0
POSITIONS = np.array([[0.0, 0.0, 0.0], [1.1, 0.2, -0.1], [-0.4, 1.3, 0.5], [0.9, -1.2, 1.4], [2.2, 2.9, -1.7]])
SPECIES = np.array([0, 1, 2, 1, 0])

# schnetpack 2.1.1: per-atom energies and forces (-dE/dR) for this geometry and these weights.
SCHNETPACK_ENERGIES = [0.33394945728266345, 0.4277304739058967, 0.3988021820987355, 0.4277543028756598,
                       0.3338179966973688]
SCHNETPACK_FORCES = [[-0.0001778490464704703, 7.502448182750939e-05, -3.4570877273627124e-05],
                     [0.0001661283067284264, 0.00014409465524907125, -0.00016802372368118646],
                     [-1.0584465545108315e-05, -2.4155932605696934e-05, -9.087060881991671e-06],
                     [2.230520528715221e-05, -0.00019496320447088373, 0.00021168166183680524],
                     [0.0, 0.0, 0.0]]


def det(path: str, shape) -> np.ndarray:
    """Deterministic, non-trivial weights keyed by the parameter's path (the same formula fed schnetpack)."""
    seed = zlib.crc32(path.encode()) % 1000
    return 0.5 * np.sin(0.37 * np.arange(int(np.prod(shape))) + 1.3 * seed).reshape(shape)


def all_pairs_graph(positions, r_max):
    n = len(positions)
    pairs = [(i, j) for i in range(n) for j in range(n)
             if i != j and np.linalg.norm(positions[j] - positions[i]) < r_max]
    receivers = np.array([p[0] for p in pairs])
    senders = np.array([p[1] for p in pairs])
    return senders, receivers


def deterministic_params(module, positions, species, senders, receivers):
    vectors = jnp.asarray(positions[senders] - positions[receivers])
    args = (jnp.asarray(species), jnp.asarray(senders), jnp.asarray(receivers),
            jnp.ones(len(senders), bool), jnp.ones(len(species), bool))
    params = module.init(jax.random.PRNGKey(0), vectors, *args)

    def fill(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path[1:])  # drop the 'params' collection
        return jnp.asarray(det(name, leaf.shape), jnp.float64)

    return jax.tree_util.tree_map_with_path(fill, params), args


def energies_and_forces(module, params, positions, senders, args):
    receivers = args[2]

    def energy(pos):
        e = module.apply(params, pos[jnp.asarray(senders)] - pos[receivers], *args)
        return e.sum(), e

    (_, e), grad = jax.value_and_grad(energy, has_aux=True)(jnp.asarray(positions))
    return np.asarray(e), -np.asarray(grad)


def test_schnet_matches_schnetpack():
    module = build_module("schnet", 3, 12.0, dict(r_max=R_MAX, n_atom_basis=6, n_filters=4, n_interactions=2, n_rbf=5,
                                                 readout_activation="ssp"))
    senders, receivers = all_pairs_graph(POSITIONS, R_MAX)
    params, args = deterministic_params(module, POSITIONS, SPECIES, senders, receivers)
    # same parameter set as schnetpack's (names and shapes), nothing left at its random initial value
    names = {"/".join(str(getattr(k, "key", k)) for k in p[1:]) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert "interactions_1/in2f/kernel" in names and "interactions_1/in2f/bias" not in names and "readout_1/bias" in names
    e, f = energies_and_forces(module, params, POSITIONS, senders, args)
    np.testing.assert_allclose(e, SCHNETPACK_ENERGIES, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(f, SCHNETPACK_FORCES, rtol=0, atol=1e-12 * np.abs(SCHNETPACK_FORCES).max())


def test_basis_and_cutoff_closed_forms():
    r = jnp.linspace(0.0, 6.0, 61)
    fc = np.asarray(cosine_cutoff(r, 5.0))
    np.testing.assert_allclose(fc[r < 5.0], 0.5 * (np.cos(np.pi * np.asarray(r)[r < 5.0] / 5.0) + 1.0), rtol=1e-14)
    assert fc[0] == 1.0 and np.all(fc[np.asarray(r) >= 5.0] == 0.0)
    # value and slope vanish at the cutoff (C^1): forces are continuous across r_max
    slope = jax.grad(lambda x: cosine_cutoff(x, 5.0))(5.0 - 1e-9)
    assert abs(float(slope)) < 1e-8
    g = np.asarray(gaussian_rbf(jnp.array([0.0, 1.25, 2.0]), 5.0, 5))  # centres 0, 1.25, ..., 5; width 1.25
    np.testing.assert_allclose(g[1], np.exp(-0.5 * ((1.25 - np.linspace(0, 5, 5)) / 1.25) ** 2), rtol=1e-14)
    assert g[0, 0] == 1.0 and g[1, 1] == 1.0
    assert float(shifted_softplus(0.0)) == 0.0
    with pytest.raises(ValueError, match="n_rbf"):
        gaussian_rbf(jnp.array([1.0]), 5.0, 1)


def test_card_parameter_count_closed_form():
    """The full card with 3 species: embedding + per interaction (in2f, 2-layer filter net, 2-layer f2out)
    + F -> F/2 -> 1 readout; 111,745 = schnetpack 2.1.1 with nn.Embedding(3, 64) (param_counts.py)."""
    from jaxbench.potential import model_cards

    hp = model_cards()["schnet"]["hyperparameters"]
    F, nf, T, K, S = hp["n_atom_basis"], hp["n_filters"], hp["n_interactions"], hp["n_rbf"], 3
    per_block = F * nf + (K * nf + nf) + (nf * nf + nf) + (nf * F + F) + (F * F + F)
    expected = S * F + T * per_block + (F * (F // 2) + F // 2) + (F // 2 + 1)
    assert expected == 111_745
    module = build_module("schnet", S, 8.0, hp)
    senders, receivers = all_pairs_graph(POSITIONS, R_MAX)
    vectors = jnp.asarray(POSITIONS[senders] - POSITIONS[receivers])
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), vectors, jnp.asarray(SPECIES), jnp.asarray(senders),
                            jnp.asarray(receivers), jnp.ones(len(senders), bool), jnp.ones(5, bool))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == expected


def test_shared_interactions_share_one_block():
    hp = dict(r_max=R_MAX, n_atom_basis=6, n_filters=4, n_interactions=3, n_rbf=5)
    senders, receivers = all_pairs_graph(POSITIONS, R_MAX)

    def count(**extra):
        module = build_module("schnet", 3, 8.0, {**hp, **extra})
        params, args = deterministic_params(module, POSITIONS, SPECIES, senders, receivers)
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)), module, params, args

    n_sep, *_ = count()
    n_shared, module, params, args = count(shared_interactions=True)
    per_block = 6 * 4 + (5 * 4 + 4) + (4 * 4 + 4) + (4 * 6 + 6) + (6 * 6 + 6)
    assert n_sep - n_shared == 2 * per_block
    e, f = energies_and_forces(module, params, POSITIONS, senders, args)
    assert np.all(np.isfinite(f)) and np.abs(f).max() > 0


def test_unknown_hyperparameters_are_named():
    with pytest.raises(ValueError, match="n_atom_basiss"):
        build_module("schnet", 3, 8.0, dict(r_max=5.0, n_atom_basiss=64))
    with pytest.raises(ValueError, match="radial_basis"):
        build_module("schnet", 3, 8.0, dict(r_max=5.0, radial_basis="bessel"))
    with pytest.raises(ValueError, match="r_max"):
        build_module("schnet", 3, 8.0, dict(n_atom_basis=8))
