"""The ASE calculator against ASE's own finite differences, and inside ASE's MD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.md.verlet import VelocityVerlet
from ase import units

from jaxbench import data
from jaxbench.calculator import JaxbenchCalculator
from jaxbench.errors import DataError
from jaxbench.graph import build_graphs
from jaxbench.potential import Potential, model_cards
from jaxbench.stats import compute_statistics

from .conftest import requires_data

SMALL = sorted(n for n, c in model_cards().items() if n.endswith("-small"))


@requires_data
@pytest.mark.skipif(not SMALL, reason="no model cards yet")
def test_calculator_matches_ase_finite_differences():
    card = model_cards()[SMALL[0]]
    train = data.load("lips", "train")[:20]
    stats = compute_statistics(train, float(card["hyperparameters"]["r_max"]))
    pot = Potential.from_card(card, stats)
    g = build_graphs(train[:1], pot.r_max).batch([0])
    params = pot.init(jax.random.PRNGKey(0), g, dtype=jnp.float64)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])

    atoms = data.load("lips20-P2S5", "test").to_ase(0)  # 28 atoms: ASE's finite differences stay cheap
    atoms.calc = JaxbenchCalculator(pot, params)
    e = atoms.get_potential_energy()
    assert atoms.get_potential_energy(force_consistent=True) == e
    f = atoms.get_forces()
    s = atoms.get_stress()
    f_num = calculate_numerical_forces(atoms, eps=1e-4)
    s_num = calculate_numerical_stress(atoms, eps=1e-5, voigt=True, force_consistent=False)
    assert np.abs(f).max() > 1e-3
    np.testing.assert_allclose(f, f_num, atol=1e-5 * max(1, np.abs(f).max()))
    np.testing.assert_allclose(s, s_num, atol=1e-6 * max(1e-3, np.abs(s).max()) + 1e-9)
    # ASE's MD drives it: a few velocity-Verlet steps conserve energy closely at 0.5 fs.
    atoms.set_momenta(np.zeros((len(atoms), 3)))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    e0 = atoms.get_total_energy()
    dyn.run(5)
    assert abs(atoms.get_total_energy() - e0) < 1e-3 * len(atoms)
    # A molecule has no stress; a species the model lacks is refused before compute.
    mol = data.load("md17-ethanol", "test").to_ase(0)
    mol.calc = JaxbenchCalculator(pot, params)
    with pytest.raises(DataError, match="cannot represent"):
        mol.get_potential_energy()
