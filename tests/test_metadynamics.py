"""Metadynamics (jaxbench.metadynamics) against analytic cases, finite differences and ASE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxbench import metadynamics as mt

# Müller-Brown (1979), scaled by 0.1 so that its barriers are a few kT at kT = 1.
MB_A = np.array([-200.0, -100.0, -170.0, 15.0])
MB_a = np.array([-1.0, -1.0, -6.5, 0.7])
MB_b = np.array([0.0, 0.0, 11.0, 0.6])
MB_c = np.array([-10.0, -10.0, -6.5, 0.7])
MB_x0 = np.array([1.0, 0.0, -0.5, -1.0])
MB_y0 = np.array([0.0, 0.5, 1.5, 1.0])


def muller_brown(positions):
    x, y = positions[0, 0], positions[0, 1]
    dx, dy = x - MB_x0, y - MB_y0
    return 0.1 * jnp.sum(MB_A * jnp.exp(MB_a * dx**2 + MB_b * dx * dy + MB_c * dy**2))


def _xy(positions):
    return positions[0, :2]


def test_fes_of_muller_brown_matches_the_exact_potential():
    """Well-tempered metadynamics of one particle on Müller-Brown in jax-md's Langevin integrator, with the
    hill buffer carried in a scan: -gamma/(gamma-1) V_bias recovers the potential where it matters.
    Measured over seeds 0-3 at 200k steps: MAE 0.17-0.27 kT, max 0.59-0.89 kT where V < 6 kT."""
    from jax_md import simulate, space

    steps, kT = 200_000, 1.0
    meta = mt.Metadynamics(cv_fn=_xy, sigma=(0.1, 0.1), height=0.5, pace=100, max_hills=steps // 100,
                           periodic=(None, None), bias_factor=8.0, kT=kT)
    _, shift = space.free()
    init, apply = simulate.nvt_langevin(mt.biased_energy(muller_brown, meta), shift, dt=0.005, kT=kT, gamma=2.0)
    hills = mt.init_hills(meta)
    state = init(jax.random.PRNGKey(0), jnp.array([[-0.56, 1.44, 0.0]]), mass=1.0, hills=hills)

    def step(carry, i):
        state, hills = carry
        state = apply(state, hills=hills)
        return (state, mt.maybe_deposit(meta, hills, state.position, i + 1)), None

    (state, hills), _ = jax.jit(lambda s, h: lax.scan(step, (s, h), jnp.arange(steps)))(state, hills)
    assert int(hills.count) == steps // 100 and not bool(hills.full)
    mt.check_hills(hills)

    xs, ys = np.meshgrid(np.linspace(-1.5, 1.2, 60), np.linspace(-0.3, 2.0, 60))
    grid = np.stack([xs.ravel(), ys.ravel()], 1)
    f = np.asarray(mt.fes(meta, hills, grid))
    v = np.array(jax.vmap(lambda g: muller_brown(jnp.array([[g[0], g[1], 0.0]])))(jnp.asarray(grid)))
    v -= v.min()
    low = v < 6.0 * kT
    d = f[low] - v[low]
    d -= d.mean()  # a free energy is defined up to a constant
    assert np.abs(d).mean() < 0.4 * kT
    assert np.abs(d).max() < 1.2 * kT
    # the estimate is not trivially flat: it spans the potential's range over the region
    assert np.ptp(f[low]) > 4.0 * kT


def _meta(**kw):
    base = dict(cv_fn=mt.dihedral_cv((0, 1, 2, 3), (1, 2, 3, 4)), sigma=(0.35, 0.35), height=0.05, pace=1,
                max_hills=8, periodic=(2 * np.pi, 2 * np.pi))
    return mt.Metadynamics(**{**base, **kw})


def _chain(seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.cumsum(rng.normal(size=(5, 3)) + np.array([1.2, 0.0, 0.0]), axis=0))


def test_bias_forces_equal_finite_differences():
    meta = _meta()
    hills = mt.init_hills(meta)
    for seed in range(4):  # hills at four different conformations
        hills = mt.deposit(meta, hills, _chain(seed + 10))
    energy = mt.biased_energy(lambda r: 0.0 * jnp.sum(r), meta)
    r = _chain(3)
    forces = -jax.grad(energy)(r, hills=hills)
    assert float(jnp.abs(forces).max()) > 1e-4  # the bias acts here
    h = 1e-6
    fd = np.zeros(r.shape)
    for i in range(r.shape[0]):
        for k in range(3):
            e = np.zeros(r.shape)
            e[i, k] = h
            fd[i, k] = -(energy(r + e, hills=hills) - energy(r - e, hills=hills)) / (2 * h)
    np.testing.assert_allclose(np.asarray(forces), fd, atol=1e-8, rtol=1e-6)


def test_dihedral_matches_ase_and_openmm():
    """The sign convention matters: alanine's phi / psi are compared with OpenMM's reference metadynamics."""
    import openmm as mm
    from ase import Atoms

    system = mm.System()
    for _ in range(4):
        system.addParticle(1.0)
    torsion = mm.CustomTorsionForce("theta")
    torsion.addTorsion(0, 1, 2, 3, [])
    system.addForce(torsion)
    context = mm.Context(system, mm.VerletIntegrator(1.0), mm.Platform.getPlatformByName("Reference"))
    for seed in range(5):
        r = np.asarray(_chain(seed))
        ase_ref = np.deg2rad(Atoms("C5", positions=r).get_dihedral(0, 1, 2, 3))
        ase_ref = (ase_ref + np.pi) % (2 * np.pi) - np.pi  # ASE: [0, 360) degrees
        context.setPositions(r[:4] * 0.1)  # nm
        openmm_ref = context.getState(getEnergy=True).getPotentialEnergy()._value  # "energy" = theta
        got = float(mt.dihedral(*[jnp.asarray(r[i]) for i in range(4)]))
        assert got == pytest.approx(ase_ref, abs=1e-10)
        assert got == pytest.approx(openmm_ref, abs=1e-6)


def test_periodic_cv_wraps_hills_across_pi():
    meta = _meta(cv_fn=lambda r: r[0, :1], sigma=(0.2,), periodic=(2 * np.pi,))
    hills = mt.deposit(meta, mt.init_hills(meta), jnp.array([[np.pi - 0.05, 0.0, 0.0]]))
    across = float(mt.bias_at(meta, hills, jnp.array([-np.pi + 0.05])))  # 0.1 rad away through the boundary
    inside = float(mt.bias_at(meta, hills, jnp.array([np.pi - 0.15])))  # 0.1 rad away on the same side
    assert across == pytest.approx(inside, rel=1e-12)
    assert across == pytest.approx(0.05 * np.exp(-0.5 * (0.1 / 0.2) ** 2), rel=1e-12)


def test_well_tempered_heights_shrink_with_the_bias_already_there():
    meta = _meta(cv_fn=lambda r: r[0, :1], sigma=(0.2,), periodic=(None,), height=0.1, bias_factor=6.0, kT=0.025)
    r = jnp.zeros((1, 3))
    hills = mt.deposit(meta, mt.init_hills(meta), r)
    hills = mt.deposit(meta, hills, r)
    h0, h1 = np.asarray(hills.heights[:2])
    assert h0 == pytest.approx(0.1)
    assert h1 == pytest.approx(0.1 * np.exp(-0.1 / (0.025 * 5.0)), rel=1e-12)
    # FES factor gamma / (gamma - 1) on the summed bias
    f = np.asarray(mt.fes(meta, hills, np.array([[0.0], [10.0]])))
    assert f[1] == pytest.approx(6.0 / 5.0 * (h0 + h1), rel=1e-12) and f[0] == 0.0


def test_full_hill_buffer_is_a_named_condition():
    meta = _meta(max_hills=3)
    hills = mt.init_hills(meta)

    def run(hills):
        def body(h, i):
            return mt.maybe_deposit(meta, h, _chain(0) + 0.01 * i, i + 1), None

        return lax.scan(body, hills, jnp.arange(5))[0]

    hills = jax.jit(run)(hills)
    assert int(hills.count) == 3 and bool(hills.full)
    # the kept hills are the first three: nothing was overwritten
    np.testing.assert_allclose(np.asarray(hills.centers[2]), np.asarray(meta.cv_fn(_chain(0) + 0.02)), rtol=1e-12)
    with pytest.raises(mt.HillBufferFull, match="3 hills"):
        mt.check_hills(hills)


def test_deposits_follow_the_pace():
    meta = _meta(pace=4, max_hills=10)

    def body(h, i):
        return mt.maybe_deposit(meta, h, _chain(0), i + 1), None

    hills = jax.jit(lambda h: lax.scan(body, h, jnp.arange(10))[0])(mt.init_hills(meta))
    assert int(hills.count) == 2  # after steps 4 and 8


def test_fes_mae_on_analytic_curves():
    """FaNE eq. 6-7 with F = 1 - cos x and F_hat = 1.5 (1 - cos x): |F - F_hat| integrates to pi over
    [-pi, pi), mean 0.5; a constant offset changes nothing (both are shifted to min 0)."""
    x = np.linspace(-np.pi, np.pi, 2001)[:-1]
    f = 1 - np.cos(x)
    out = mt.fes_mae(x, f, 1.5 * f + 7.0)
    assert out["integral"] == pytest.approx(np.pi, rel=1e-3)
    assert out["mean"] == pytest.approx(0.5, rel=1e-3)
    assert out["covered"] == pytest.approx(1.0) and out["excluded"] == 0
    g = f.copy()
    g[:500] = np.inf  # never visited: excluded and counted
    part = mt.fes_mae(x, f, g)
    assert part["excluded"] == 500 and part["covered"] == pytest.approx(0.75, rel=1e-3)


def test_free_energy_from_samples_of_a_von_mises_distribution():
    """p(x) ~ exp(kappa cos x): F = kT kappa (1 - cos x) up to sampling noise."""
    kT, kappa = 2.5, 2.0
    x = np.random.default_rng(0).vonmises(0.0, kappa, size=400_000)
    centres, f = mt.free_energy_1d(x, bins=36, kT=kT)
    exact = kT * kappa * (1 - np.cos(centres))
    ok = exact < 3 * kT
    d = f[ok] - exact[ok]
    assert np.abs(d - d.mean()).max() < 0.1 * kT
