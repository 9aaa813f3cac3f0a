"""Dataset statistics against independent computations (NumPy by hand, ASE's neighbour list)."""

from __future__ import annotations

import numpy as np
from ase.neighborlist import neighbor_list

from jaxbench import data
from jaxbench.stats import DatasetStatistics, atomic_energies_lstsq, compute_statistics

from .conftest import requires_data


@requires_data
def test_statistics_lips20_train_by_hand(data_root):
    fr = data.load("lips20", "train")[::50]  # 5 compositions, 90 frames
    st = compute_statistics(fr, cutoff=5.0)
    assert st.species == (3, 15, 16)
    # Least squares by hand: one row per frame, counts of Li, P, S.
    A = np.array([[np.sum(fr.frame(f)["numbers"] == z) for z in (3, 15, 16)] for f in range(len(fr))], float)
    e0 = np.linalg.solve(A.T @ A, A.T @ fr.energy)  # full rank: five compositions
    np.testing.assert_allclose([st.atomic_energies[z] for z in (3, 15, 16)], e0, rtol=1e-8)
    resid = (fr.energy - A @ e0) / fr.n_atoms
    np.testing.assert_allclose(st.energy_per_atom_mean, resid.mean(), atol=1e-9)
    np.testing.assert_allclose(st.energy_per_atom_std, resid.std(), atol=1e-9)
    np.testing.assert_allclose(st.force_rms, np.sqrt(np.mean(fr.forces**2)), rtol=1e-12)
    n_pairs = sum(len(neighbor_list("i", fr.to_ase(f), 5.0)) for f in range(len(fr)))
    np.testing.assert_allclose(st.avg_num_neighbors, n_pairs / fr.n_atoms.sum(), rtol=1e-12)
    # JSON round trip (run directories store it).
    assert DatasetStatistics.from_json(st.to_json()) == st


@requires_data
def test_single_composition_is_minimum_norm(data_root):
    fr = data.load("md17-ethanol", "train")
    e0 = atomic_energies_lstsq(fr)
    counts = np.array([6, 2, 1])
    pred = counts @ np.array([e0[1], e0[6], e0[8]])
    # Rank one: the fit reproduces the mean energy and is the minimum-norm solution (parallel to counts).
    np.testing.assert_allclose(pred, fr.energy.mean(), rtol=1e-10)
    v = np.array([e0[1], e0[6], e0[8]])
    np.testing.assert_allclose(v / np.linalg.norm(v), counts / np.linalg.norm(counts) * np.sign(v[0]), atol=1e-10)
