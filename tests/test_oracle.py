"""Reference oracle: labels on saved frames and reference rollouts, against ASE computed independently."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp
from ase.calculators.lj import LennardJones
from ase.neighborlist import neighbor_list

from jaxbench import md, oracle
from jaxbench.errors import JaxbenchError
from jaxbench.md.potentials import pair_r

from .test_md import argon

SIGMA, EPSILON, RC = 3.405, 0.0104, 7.0


def shifted_lj(graph):
    """The physics of ASE's LennardJones(smooth=False): pair energy shifted to 0 at rc, force jumps."""
    r, inside = pair_r(graph, RC)
    lj = lambda x: 4 * EPSILON * ((SIGMA / x) ** 12 - (SIGMA / x) ** 6)  # noqa: E731
    return 0.5 * jnp.sum(jnp.where(inside, lj(r) - lj(RC), 0.0))


def ase_lj():
    return LennardJones(sigma=SIGMA, epsilon=EPSILON, rc=RC, smooth=False)


@pytest.fixture(scope="module")
def nve_run(tmp_path_factory):
    """32 Ar atoms (box 11.6 Å < 2 rc: several periodic images per pair), 2 replicas, NVE, to disk."""
    out = tmp_path_factory.mktemp("oracle") / "lj.h5"
    p = md.Protocol(ensemble="nve", temperature_K=120.0, timestep_fs=2.0, steps=60, replicas=2, save_every=10, chunk_steps=30)
    res = md.simulate(md.lennard_jones(SIGMA, EPSILON, RC), argon(2, replicas=2, jitter=0.05), p, seed=1, out=out,
                      keep_arrays=True, progress=False)
    return res


def test_jax_labels_match_ase_lennard_jones_plus_force_shift(nve_run):
    """jaxbench's force-shifted LJ as a JAX oracle vs ASE's shifted LJ on the saved frames (read from
    the H5MD file): they differ exactly by the force-shift term -sum_pairs (r - rc) dV/dr(rc),
    computed here from ASE's neighbor list."""
    jax_labels = oracle.evaluate_frames(md.lennard_jones(SIGMA, EPSILON, RC), nve_run.path, block=4)
    ase_labels = oracle.evaluate_frames(ase_lj(), nve_run.path)
    tr = nve_run.arrays
    assert jax_labels["energy"].shape == (2, 7) and jax_labels["forces"].shape == (2, 7, 32, 3)
    dv_rc = 4 * EPSILON * (-12 * SIGMA**12 / RC**13 + 6 * SIGMA**6 / RC**7)
    import ase

    for r in range(2):
        for t in range(7):
            atoms = ase.Atoms([18] * 32, positions=tr["position"][r, t], cell=tr["cell"], pbc=True)
            i, d, D = neighbor_list("idD", atoms, RC)
            e_shift = -0.5 * dv_rc * np.sum(d - RC)
            f_shift = np.zeros((32, 3))
            np.add.at(f_shift, i, -dv_rc * D / d[:, None])
            assert jax_labels["energy"][r, t] == pytest.approx(ase_labels["energy"][r, t] + e_shift, abs=1e-10)
            np.testing.assert_allclose(jax_labels["forces"][r, t], ase_labels["forces"][r, t] + f_shift, atol=1e-10)
    assert np.abs(e_shift) > 1e-3  # the shift is not negligible: a mismatch above would show
    # the oracle is the model itself: its labels are the saved values, EV = FV = 0
    np.testing.assert_allclose(jax_labels["energy"], tr["potential_energy"], atol=1e-10)
    v = oracle.violations(jax_labels)
    assert v["ev"].max() < 1e-20 and v["fv"].max() < 1e-10
    # against ASE's (different) physics the violations are real and the same as computed by hand
    v = oracle.violations(tr, ase_labels)
    e_m, e_r = tr["potential_energy"], ase_labels["energy"]
    np.testing.assert_allclose(v["ev"], (e_m - e_r) ** 2 / (e_m**2 + e_r**2), rtol=1e-12)
    assert v["ev"].min() > 1e-8 and v["fv"].min() > 1e-4
    assert v["ev_summary"].per_replica.shape == (2,)
    # subsets: replica 1, every other frame
    sub = oracle.evaluate_frames(ase_lj(), nve_run, replicas=[1], every=2)
    np.testing.assert_allclose(sub["energy"][0], ase_labels["energy"][1, ::2])
    assert list(sub["step"]) == [0, 20, 40, 60]


@pytest.mark.parametrize("ensemble", ["nve", pytest.param("nvt_nose_hoover", marks=pytest.mark.slow)])
def test_ase_reference_rollout_reproduces_the_same_physics(ensemble):
    """Model = the JAX shifted LJ, oracle = ASE's LennardJones: same physics, so ASE's VelocityVerlet /
    NoseHooverChainNVT from the model's initial state must retrace the jax-md trajectory (this pins
    the unit conversions of velocities, timestep and Nosé–Hoover coupling time)."""
    st = argon(2, replicas=2, jitter=0.05)
    p = md.Protocol(ensemble=ensemble, temperature_K=120.0, timestep_fs=2.0, steps=60, replicas=2, save_every=10,
                    chunk_steps=30, tau_fs=100.0)
    res = md.simulate(shifted_lj, st, p, cutoff=RC, seed=1, progress=False)
    ref = oracle.reference_rollout(ase_lj(), res)
    a = res.arrays
    assert ref["position"].shape == a["position"].shape and not ref["failed"].any()
    np.testing.assert_allclose(ref["position"], a["position"], atol=1e-6)
    np.testing.assert_allclose(ref["temperature"], a["temperature"], rtol=1e-6)
    assert np.ptp(a["temperature"]) > 20  # the trajectory really moved (T falls ~140 K -> ~60 K)
    v = oracle.violations(a, ref)
    assert v["ev"].max() < 1e-12 and v["fv"].max() < 1e-5
    # ... and a different oracle (ASE's smooth cutoff) does not retrace it
    smooth = oracle.reference_rollout(LennardJones(sigma=SIGMA, epsilon=EPSILON, rc=RC, smooth=True), res)
    assert np.abs(smooth["position"][:, -1] - a["position"][:, -1]).max() > 1e-4


def test_jax_reference_rollout_and_scaled_oracle():
    """A JAX oracle rolls out through simulate from the same state and seed (Langevin: same noise):
    against the model itself EV = FV = 0 at every frame; an oracle with epsilon x 1.05 has energies
    exactly 1.05 x and forces 1.05 x at the shared start, so EV(0) = 0.05^2 / (1 + 1.05^2) and
    FV(0) = 0.05 / 2.05."""
    lj = md.lennard_jones(SIGMA, EPSILON, RC)
    p = md.Protocol(ensemble="nvt_langevin", temperature_K=120.0, timestep_fs=2.0, steps=40, replicas=2, save_every=10,
                    chunk_steps=20, friction_per_fs=0.02)
    res = md.simulate(lj, argon(2, replicas=2, jitter=0.05), p, seed=3, progress=False)
    ref = oracle.reference_rollout(lj, res)
    # equal up to the velocity round trip (Å/fs on disk <-> momenta inside): ~1e-16 relative
    np.testing.assert_allclose(ref["position"], res.arrays["position"], rtol=0, atol=1e-12)
    v = oracle.violations(res.arrays, ref)
    assert v["ev"].max() < 1e-24 and v["fv"].max() < 1e-12
    # same function, other params: reuses the compiled engine
    strong = md.as_energy_model(lj, params={"sigma": jnp.asarray(SIGMA), "epsilon": jnp.asarray(EPSILON * 1.05)})
    ref2 = oracle.reference_rollout(strong, res)
    v2 = oracle.violations(res.arrays, ref2)
    np.testing.assert_allclose(v2["ev"][:, 0], 0.05**2 / (1 + 1.05**2), rtol=1e-9)
    np.testing.assert_allclose(v2["fv"][:, 0], 0.05 / 2.05, rtol=1e-9)
    assert np.abs(ref2["position"][:, -1] - res.arrays["position"][:, -1]).max() > 1e-4
    # ASE Langevin: its own noise, so only statistics compare; it runs and stays near the target
    ase_ref = oracle.reference_rollout(ase_lj(), res)
    assert np.all(np.isfinite(ase_ref["position"])) and not ase_ref["failed"].any()
    np.testing.assert_allclose(ase_ref["position"][:, 0], res.arrays["position"][:, 0])
    assert 40 < ase_ref["temperature"][:, 1:].mean() < 300
    # its centre of mass stays put (FixCom; equal masses: the mean position), as ours (zero total momentum)
    com = ase_ref["position"].mean(axis=2)
    np.testing.assert_allclose(com, np.broadcast_to(com[:, :1], com.shape), atol=1e-9)


def test_oracle_input_errors(nve_run, tmp_path):
    with pytest.raises(JaxbenchError, match="does not exist"):
        oracle.evaluate_frames(ase_lj(), tmp_path / "missing.h5")
    with pytest.raises(JaxbenchError, match="replicas"):
        oracle.evaluate_frames(ase_lj(), nve_run, replicas=[5])
    with pytest.raises(JaxbenchError, match="cutoff"):
        oracle.evaluate_frames(shifted_lj, nve_run)  # a bare fn(graph) needs its cutoff
    labels = oracle.evaluate_frames(ase_lj(), nve_run, every=2)
    with pytest.raises(JaxbenchError, match="differ"):
        oracle.violations(nve_run.arrays, labels)
    from jaxbench.errors import DataError

    limited = md.EnergyModel(fn=md.lennard_jones().fn, cutoff=RC, params=md.lennard_jones().params, species=(1, 8), name="h2o")
    with pytest.raises(DataError, match="cannot represent Ar"):
        oracle.evaluate_frames(limited, nve_run)
