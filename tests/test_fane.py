"""FaNE's alanine free-energy benchmark: jaxbench's metadynamics against OpenMM's, and the FES scores on
analytic surfaces."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import fane
from jaxbench import metadynamics as mt

KT_300 = 300 * 8.617333262e-5  # eV
GRID = np.linspace(-np.pi, np.pi, 73)


def test_openmm_reference_metadynamics_equals_jaxbench_hills():
    """OpenMM's app.Metadynamics (grid bias) and jaxbench's Gaussian sum are the same well-tempered bias:
    rebuilding the hills from OpenMM's CVs at its deposit times reproduces its free energy (measured:
    max difference 2e-7 eV of 0.11 eV), which checks heights, widths, periodicity and the FES factor."""
    from jaxbench.generate.openmm_metad import PHI, PSI, reference_metadynamics
    from jaxbench.generate.openmm_systems import alanine_system

    _, _, x_nm = alanine_system()
    positions = np.asarray(x_nm) * 10.0
    out = reference_metadynamics(positions, 10_000, pace_steps=250, save_every=250, height_kJ_mol=1.2, grid=73)
    meta = mt.Metadynamics(cv_fn=lambda s: s, sigma=(0.35, 0.35), height=1.2 * mt.KJ_PER_MOL_IN_EV, pace=1,
                           max_hills=64, periodic=(2 * np.pi, 2 * np.pi), bias_factor=6.0, kT=KT_300)
    hills = mt.init_hills(meta)
    for phi, psi in zip(out["phi"], out["psi"]):
        hills = mt.deposit(meta, hills, jnp.array([phi, psi]))
    assert int(hills.count) == 40
    ours = fane.fes_grid(meta, hills, out["grid_rad"])
    assert out["fes_eV"].max() > 0.05  # forty hills of 1.2 kJ/mol: a real bias
    np.testing.assert_allclose(ours, out["fes_eV"], atol=2e-3 * out["fes_eV"].max())
    # the CVs are phi / psi as jaxbench computes them on the same atoms (sign convention included)
    cv = mt.dihedral_cv(PHI, PSI)(jnp.asarray(positions))
    assert np.all(np.isfinite(np.asarray(cv)))


def _separable(a_phi, a_psi):
    phi, psi = np.meshgrid(GRID, GRID)  # [i_psi, i_phi]
    return a_phi * (1 - np.cos(phi)) + a_psi * (1 - np.cos(psi))


def test_marginals_of_a_separable_surface():
    f_phi, f_psi = fane.marginals(_separable(0.1, 0.05), KT_300)
    np.testing.assert_allclose(f_phi, 0.1 * (1 - np.cos(GRID)), atol=1e-12)
    np.testing.assert_allclose(f_psi, 0.05 * (1 - np.cos(GRID)), atol=1e-12)


def test_fes_scores_in_kj_mol():
    """Model = 1.5 x reference (separable, a = 10 kJ/mol on phi): |F - F_hat| = 5 (1 - cos phi) kJ/mol,
    whose mean over [-pi, pi) is 5 kJ/mol; psi identical in both: 0."""
    a = 10 * mt.KJ_PER_MOL_IN_EV
    ref = _separable(a, 0.5 * a)
    model = _separable(1.5 * a, 0.5 * a)
    s = fane.fes_scores(model, ref, GRID, KT_300)
    assert s["F(phi)"]["mae_kJ_mol"] == pytest.approx(5.0, rel=1e-3)
    assert s["F(psi)"]["mae_kJ_mol"] == pytest.approx(0.0, abs=1e-9)
    assert s["F(phi)"]["integral_kJ_mol_rad"] == pytest.approx(10 * np.pi, rel=1e-3)


def test_six_local_minima_of_a_periodic_surface():
    """(1 - cos 2 phi) + (1 - cos 3 psi) has minima at phi in {0, pi}, psi in {0, +-2pi/3}: six. A small
    tilt orders them; the minimum at phi = pi sits on the grid's periodic edge and must still be found."""
    phi, psi = np.meshgrid(GRID, GRID)
    f = (1 - np.cos(2 * phi)) + (1 - np.cos(3 * psi)) + 0.05 * (1 - np.cos(phi)) + 0.01 * np.sin(psi)
    minima = fane.local_minima(f, GRID, n=6)
    assert len(minima) == 6
    found = {(round(abs(m[0]) / (np.pi / 3)), round(m[1] / (2 * np.pi / 3))) for m in minima}
    assert found == {(0, -1), (0, 0), (0, 1), (3, -1), (3, 0), (3, 1)}
    assert minima[0][0] == pytest.approx(0.0, abs=0.1)  # the tilt makes phi = 0 deepest
    assert [m[2] for m in minima] == sorted(m[2] for m in minima)


def test_frames_near_wraps_the_torus():
    phi = np.array([0.0, np.pi - 0.01, 1.0])
    psi = np.array([0.0, 0.0, 1.0])
    assert fane.frames_near(phi, psi, [(-np.pi + 0.01, 0.0), (0.9, 1.1)]) == [1, 2]


def test_ramachandran_plot_writes_a_figure(tmp_path):
    path = fane.ramachandran_plot(tmp_path / "rama.png", GRID, _separable(0.1, 0.05), _separable(0.12, 0.04), KT_300)
    assert (tmp_path / "rama.png").stat().st_size > 10_000 and path.endswith("rama.png")


def test_ramachandran_plot_without_a_finished_run_shows_the_visited_angles(tmp_path):
    """No model surface (every run failed): the figure still exists, with the frames visited before failure
    drawn in the model panel; drawing them changes the image."""
    ref = _separable(0.1, 0.05)
    cv = np.array([[-1.4, 1.2], [-1.3, 1.1], [-1.5, 1.3]])
    a = fane.ramachandran_plot(tmp_path / "a.png", GRID, ref, None, KT_300, model_cv_rad=cv, note="none of 2 runs finished")
    b = fane.ramachandran_plot(tmp_path / "b.png", GRID, ref, None, KT_300, note="none of 2 runs finished")
    assert (tmp_path / "a.png").stat().st_size > 10_000
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes() and a != b


def test_sampled_fes_finds_the_basins_of_the_samples():
    """Samples drawn around three (phi, psi) basins, one of them across the +-pi edge: the kernel FES has its
    minima there, and the deepest is the most populated basin."""
    rng = np.random.default_rng(0)
    centres = [(-1.4, 2.8, 6000), (-1.3, -0.6, 3000), (np.pi - 0.05, -2.9, 1000)]
    phi = np.concatenate([rng.normal(c[0], 0.2, c[2]) for c in centres])
    psi = np.concatenate([rng.normal(c[1], 0.2, c[2]) for c in centres])
    f = fane.sampled_fes(phi, psi, KT_300, GRID)
    minima = fane.local_minima(f, GRID, n=3)
    for (p, q, _), (cp, cq, _) in zip(minima, centres):
        assert abs((p - cp + np.pi) % (2 * np.pi) - np.pi) < 0.15
        assert abs((q - cq + np.pi) % (2 * np.pi) - np.pi) < 0.15
    # populations 6:3:1 -> free-energy differences kT ln 2 and kT ln 6 between the basins
    assert minima[1][2] - minima[0][2] == pytest.approx(KT_300 * np.log(2), rel=0.15)
