"""NPT (``ensemble: npt_nose_hoover``, jax-md's isotropic MTK barostat) on a Lennard-Jones argon solid.

The pressure the engine reports is checked frame by frame against the virial computed by hand (NumPy on
ASE's neighbour list); the mean pressure against the target; the cell against the start cell scaled
with the volume; the conserved quantity's drift against a bound; resume bit for bit. The slow test
compares the compressibility from the volume fluctuations with the one from NVT runs at two volumes
(the oracle: the same potential with a fixed cell, pressure by hand)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from jaxbench import md, trajectory
from jaxbench.errors import JaxbenchError
from jaxbench.md.protocol import EV_PER_A3_IN_BAR, FS_PER_TIME_UNIT

from .test_md_resume import Crash, crash_after, same_file

SIGMA, EPS, RC = 3.405, 0.0104, 7.0
LJ = md.lennard_jones(SIGMA, EPS, RC)
A = 5.5  # Å: near the 1 bar volume of this force-shifted LJ solid at 40 K
BASE = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def fcc(cells: int, replicas: int, a: float = A) -> md.Start:
    pos = np.array([(b + np.array([i, j, k])) * a for i in range(cells) for j in range(cells) for k in range(cells)
                    for b in BASE])
    return md.Start.make(np.stack([pos] * replicas), [18] * len(pos), np.eye(3) * cells * a, True)


def npt(**kw) -> md.Protocol:
    d = dict(ensemble="npt_nose_hoover", temperature_K=40.0, timestep_fs=5.0, steps=3000, replicas=4, save_every=20,
             chunk_steps=1000, pressure_bar=500.0, barostat_tau_fs=500.0, tau_fs=100.0)
    d.update(kw)
    return md.Protocol(**d)


def virial_pressure_bar(positions, velocities, masses, cell) -> float:
    """(2 KE + sum_{i<j} r_ij f_ij) / (3 V) of the force-shifted LJ, by hand on ASE's neighbour list."""
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    atoms = Atoms([18] * len(positions), positions=positions, cell=cell, pbc=True)
    atoms.wrap()
    d = neighbor_list("d", atoms, RC)  # every ordered pair: each pair twice

    def dlj(x):
        return 4 * EPS * (-12 * SIGMA**12 / x**13 + 6 * SIGMA**6 / x**7)

    w = 0.5 * np.sum(d * -(dlj(d) - dlj(RC)))
    ke = 0.5 * np.sum(masses[:, None] * velocities**2) * FS_PER_TIME_UNIT**2  # amu Å²/fs² -> eV
    return (2 * ke + w) / (3 * abs(np.linalg.det(cell))) * EV_PER_A3_IN_BAR


def test_npt_holds_the_pressure_saves_the_cell_and_resumes(tmp_path):
    st, p = fcc(2, 4), npt()
    res = md.simulate(LJ, st, p, seed=2, out=tmp_path / "npt.h5", progress=False)
    assert not res.failed.any()
    tr = trajectory.read(res.path)
    vol, box, pres = tr["volume"], tr["box_edges"], tr["pressure"]
    assert box.shape == (4, 151, 3, 3) and tr["info"]["protocol"]["ensemble"] == "npt_nose_hoover"
    # the cell keeps its shape and scales with the volume
    v0 = np.linalg.det(st.cell)
    np.testing.assert_allclose(vol, np.linalg.det(box), rtol=1e-12)
    np.testing.assert_allclose(box, st.cell * np.cbrt(vol / v0)[..., None, None], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(vol[:, 0], v0, rtol=1e-12)
    assert np.all(np.abs(vol[:, 50:] / v0 - 1) > 1e-4)
    # the reported pressure is the virial pressure of the saved frame
    for r, t in ((0, 0), (0, 120), (3, 150)):
        by_hand = virial_pressure_bar(tr["position"][r, t], tr["velocity"][r, t], tr["mass"], box[r, t])
        np.testing.assert_allclose(pres[r, t], by_hand, rtol=1e-7, atol=1e-6)
    # after 1000 steps (five barostat times) the mean pressure is the target, within 3 standard errors of
    # the replicas' means (4 independent replicas); the temperature is the thermostat's
    means = pres[:, 50:].mean(axis=1)
    se = means.std(ddof=1) / np.sqrt(len(means))
    assert abs(means.mean() - 500.0) < max(3 * se, 30.0), (means, se)
    assert abs(tr["temperature"][:, 50:].mean() - 40.0) < 2.0
    # compressed from the ~1 bar start: 500 bar is ~5% of this solid's bulk modulus
    assert 0.9 < vol[:, 50:].mean() / v0 < 0.99
    # the MTK conserved quantity: measured drift 1e-5 eV/atom over 15-20 ps; bound 5e-5
    c = tr["conserved_energy"]
    assert np.all(np.abs(c[:, -1] - c[:, 0]) / st.n_atoms < 5e-5), c[:, -1] - c[:, 0]
    # the extended-XYZ export carries each frame's cell
    import ase.io

    assert trajectory.to_extxyz(res.path, tmp_path / "npt.extxyz", every=100) == 2
    images = ase.io.read(tmp_path / "npt.extxyz", ":")
    np.testing.assert_allclose(np.asarray(images[1].cell), box[0, 100], rtol=1e-9)
    # killed after the second of three chunks: resumed bit for bit (barostat chain, box momentum and all)
    cut = tmp_path / "cut.h5"
    with pytest.raises(Crash):
        md.simulate(LJ, st, p, seed=2, out=cut, progress=False, callback=crash_after(1))
    again = md.simulate(LJ, st, p, seed=2, out=cut, progress=False, resume=True)
    assert again.timings["resumed_at_step"] == 2000
    same_file(res.path, cut)


def test_npt_volume_jaxbench_bookkeeping_matches_the_ase_route():
    """materials.npt_volume_jaxbench (4 replicas; the protocol of the test above, so its compiled chunk is
    reused in this process): the keys of the ASE route, the sampled frames, the replica standard error."""
    from jaxbench import materials

    from .test_materials import NPT_KEYS, ForceShiftedLJ, argon, check_npt_bookkeeping

    at = argon()
    kw = dict(pressure_bar=500.0, timestep_fs=5.0, steps=500, equilibration_steps=500, sample_every=20, n_blocks=5,
              seed=1, lattice_constant=5.5)
    r = materials.npt_volume_jaxbench(LJ, at, 40.0, replicas=4, barostat_tau_fs=500.0, tau_fs=100.0, **kw)
    check_npt_bookkeeping(r, at, 5.5)
    assert r["n_replicas"] == 4 and r["n_samples"] == 100 and r["n_blocks"] is None and r["failed_replicas"] == []
    assert r["stderr_method"] == "replica means: 4 independent replicas"
    vr = r["replica_volumes_A3"]
    assert len(vr) == 4 and len(set(vr)) == 4  # independent velocities
    assert r["volume_A3"] == pytest.approx(np.mean(vr), rel=1e-12)
    assert r["volume_stderr_A3"] == pytest.approx(np.std(vr, ddof=1) / 2, rel=1e-9)
    assert r["tau_fs"] == pytest.approx(100.0) and r["barostat_tau_fs"] == pytest.approx(500.0)
    assert 0.95 < r["linear_scale"] < 1.0  # compressed by 500 bar
    # the oracle route with the same potential returns the same keys
    a = materials.npt_volume_ase(at, ForceShiftedLJ(), 40.0, tdamp_fs=100.0, pdamp_fs=500.0,
                                 **dict(kw, steps=100, equilibration_steps=40))
    check_npt_bookkeeping(a, at, 5.5)
    assert NPT_KEYS <= set(a)
    assert set(a) - {"tdamp_fs", "pdamp_fs"} == set(r) - {"tau_fs", "barostat_tau_fs", "failed_replicas",
                                                           "replica_volumes_A3"}


def test_npt_stops_a_replica_compressed_beyond_the_list_and_refuses_what_it_cannot_do():
    import jax.numpy as jnp

    from jaxbench.md.engine import Engine
    from jaxbench.md.failures import describe_failure

    st, p = fcc(2, 1), npt(max_compression=0.1)
    eng = Engine(p, LJ, st.numbers, st.cell, st.pbc, nl=None, hook=None, batch="map")
    n = st.n_atoms
    bonds = (jnp.zeros(1, int), jnp.zeros(1, int), jnp.zeros(1), jnp.zeros(1, bool))

    def state(volume_ratio):
        return types.SimpleNamespace(position=jnp.asarray(st.positions[0]), momentum=jnp.ones((n, 3)) * 0.05,
                                     force=jnp.zeros((n, 3)), mass=jnp.full((n, 1), 40.0),
                                     box_position=jnp.asarray(np.log(volume_ratio) / 3))

    assert int(eng.check(state(0.91), bonds)) == 0
    bad = int(eng.check(state(0.89), bonds))
    assert bad == 16 and "max_compression" in describe_failure(bad)
    # the list radius covers the most compressed cell allowed
    assert p.list_radius_factor == pytest.approx(0.9 ** (-1 / 3))
    with pytest.raises(JaxbenchError, match="periodic along all three"):
        md.simulate(LJ, md.Start.make(st.positions, st.numbers, st.cell, [True, True, False]), p, progress=False)
    with pytest.raises(JaxbenchError, match="FailureHook"):
        md.simulate(LJ, st, p, progress=False, failure_fn=md.FailureHook(lambda s: 0, lambda m, s: (m, False, 0)))
    for key, value in (("pressure_bar", float("nan")), ("barostat_tau_fs", -1.0), ("max_compression", 1.5),
                       ("tau_fs", 0.0)):
        with pytest.raises(JaxbenchError, match=f"key '{key}'"):
            npt(**{key: value}).validate()


@pytest.mark.slow
def test_npt_volume_fluctuations_give_the_compressibility_of_nvt_pressures():
    """kappa_T = var(V) / (kT <V>) from NPT at 1 bar, against -(1/V) dV/dP from NVT runs at 0.98 and 1.02
    times the NPT mean volume (pressure by hand). Measured (2026-12-07): see the assertion message."""
    st, p = fcc(2, 8), npt(pressure_bar=1.0, steps=20000, chunk_steps=2000, replicas=8)
    res = md.simulate(LJ, st, p, seed=5, progress=False)
    assert not res.failed.any()
    vol = res.arrays["volume"][:, 100:]
    v_mean = vol.mean()
    kappa_fluct = vol.var() / (p.kT * v_mean)  # Å³/eV
    pressures = []
    for f in (0.98, 1.02):
        a = A * np.cbrt(f * v_mean / np.linalg.det(st.cell))
        nvt = dict(ensemble="nvt_nose_hoover", temperature_K=40.0, timestep_fs=5.0, steps=6000, replicas=8,
                   save_every=20, chunk_steps=2000, tau_fs=100.0)
        r = md.simulate(LJ, fcc(2, 8, a), md.Protocol(**nvt), seed=6, progress=False)
        tr = r.arrays
        cell = np.eye(3) * 2 * a
        pressures.append(np.mean([virial_pressure_bar(tr["position"][k, t], tr["velocity"][k, t], tr["mass"], cell)
                                  for k in range(8) for t in range(50, tr["position"].shape[1], 5)]))
    dP = (pressures[1] - pressures[0]) / EV_PER_A3_IN_BAR
    kappa_nvt = -(0.04 / dP)  # -(1/V) dV/dP with dV / V = 0.04
    assert abs(kappa_fluct / kappa_nvt - 1) < 0.25, (kappa_fluct, kappa_nvt)
    print(f"kappa_T: NPT fluctuations {kappa_fluct:.1f}, NVT slope {kappa_nvt:.1f} A^3/eV "
          f"(bulk modulus {1 / kappa_fluct * EV_PER_A3_IN_BAR / 1e4:.2f} vs {1 / kappa_nvt * EV_PER_A3_IN_BAR / 1e4:.2f} GPa)")

