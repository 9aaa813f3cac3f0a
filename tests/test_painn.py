"""PaiNN: Bessel basis against its closed form, the whole model against schnetpack 2.1.1, parameter counts.

The reference numbers were produced by schnetpack 2.1.1 (torch 2.13, float64, Bessel frequencies rebuilt in
float64) for the geometry and deterministic weights of tests/test_schnet.py: `representation.PaiNN(
n_atom_basis=6, n_interactions=2, BesselRBF(4, 3.0), CosineCutoff(3.0), nuclear_embedding=nn.Embedding(3, 6))`
+ `atomistic.Atomwise(n_in=6)`'s outnet (silu). Atom 4 is isolated: its vector features stay exactly zero,
which exercises the epsilon inside the norm of the mixing block.
Regenerate with `/work/refenv/bin/python benchmarks/ref_models/schnet.py` (reference venv with schnetpack).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench.models import build_module
from jaxbench.models.painn import bessel_rbf

from .test_schnet import POSITIONS, R_MAX, SPECIES, all_pairs_graph, deterministic_params, energies_and_forces

jax.config.update("jax_enable_x64", True)

SCHNETPACK_ENERGIES = [0.3407551280144162, 0.44318956623810174, 0.4436995929497421, 0.47063372342941034,
                       0.3692759707224117]
SCHNETPACK_FORCES = [[0.3160006530988033, 0.05740388473619083, -0.0356452234876507],
                     [-0.2932069028838653, -0.0734404470322366, 0.016904582788945178],
                     [-0.02567324270196842, 0.02240030877288416, 0.011497122521099832],
                     [0.002879492487030405, -0.006363746476838394, 0.007243518177605691],
                     [0.0, 0.0, 0.0]]


def test_painn_matches_schnetpack():
    module = build_module("painn", 3, 12.0, dict(r_max=R_MAX, n_atom_basis=6, n_interactions=2, n_rbf=4))
    senders, receivers = all_pairs_graph(POSITIONS, R_MAX)
    params, args = deterministic_params(module, POSITIONS, SPECIES, senders, receivers)
    e, f = energies_and_forces(module, params, POSITIONS, senders, args)
    np.testing.assert_allclose(e, SCHNETPACK_ENERGIES, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(f, SCHNETPACK_FORCES, rtol=0, atol=1e-12 * np.abs(SCHNETPACK_FORCES).max())
    # a second, rotated + reflected copy of the molecule gives the same per-atom energies
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0] @ np.diag([1.0, 1.0, -1.0])
    e2, f2 = energies_and_forces(module, params, POSITIONS @ q.T, senders, args)
    np.testing.assert_allclose(e2, e, rtol=1e-12)
    np.testing.assert_allclose(f2, f @ q.T, atol=1e-12)


def test_bessel_closed_form():
    r = jnp.array([0.0, 0.7, 2.9, 3.0, 4.0])
    b = np.asarray(bessel_rbf(r, 3.0, 4))
    n = np.arange(1, 5)
    for k, x in enumerate(np.asarray(r)[1:], start=1):
        np.testing.assert_allclose(b[k], np.sin(n * np.pi * x / 3.0) / x, rtol=1e-13, atol=1e-15)
    assert np.all(b[0] == 0.0)  # schnetpack: r = 0 -> sin(0) / 1
    assert np.all(np.isfinite(np.asarray(jax.jacfwd(lambda x: bessel_rbf(x, 3.0, 4))(r))))


def _count(hp, num_species=3):
    module = build_module("painn", num_species, 8.0, hp)
    senders, receivers = all_pairs_graph(POSITIONS, R_MAX)
    vectors = jnp.asarray(POSITIONS[senders] - POSITIONS[receivers])
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), vectors, jnp.asarray(SPECIES), jnp.asarray(senders),
                            jnp.asarray(receivers), jnp.ones(len(senders), bool), jnp.ones(5, bool))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def closed_form(F, T, K, S, shared_interactions=False, shared_filters=False):
    message = (F * F + F) + (F * 3 * F + 3 * F)
    mixing = (2 * F * F + F) + (F * 3 * F + 3 * F) + F * 2 * F
    filters = K * 3 * F * (1 if shared_filters else T) + 3 * F * (1 if shared_filters else T)
    blocks = (message + mixing) * (1 if shared_interactions else T)
    return S * F + filters + blocks + (F * (F // 2) + F // 2) + (F // 2 + 1)


def test_card_parameter_count_closed_form():
    """576,641 = schnetpack 2.1.1 PaiNN + Atomwise with nn.Embedding(3, 128) (benchmarks/param_counts.py)."""
    from jaxbench.potential import model_cards

    hp = model_cards()["painn"]["hyperparameters"]
    expected = closed_form(hp["n_atom_basis"], hp["n_interactions"], hp["n_rbf"], 3)
    assert expected == 576_641
    assert _count(hp) == expected


@pytest.mark.parametrize("shared_interactions,shared_filters", [(True, False), (False, True), (True, True)])
def test_shared_weights(shared_interactions, shared_filters):
    hp = dict(r_max=R_MAX, n_atom_basis=6, n_interactions=3, n_rbf=4, shared_interactions=shared_interactions,
              shared_filters=shared_filters)
    assert _count(hp) == closed_form(6, 3, 4, 3, shared_interactions, shared_filters)


def test_unknown_hyperparameters_are_named():
    with pytest.raises(ValueError, match="n_rbfs"):
        build_module("painn", 3, 8.0, dict(r_max=5.0, n_rbfs=20))
    with pytest.raises(ValueError, match="radial_basis"):
        build_module("painn", 3, 8.0, dict(r_max=5.0, radial_basis="gaussian"))
