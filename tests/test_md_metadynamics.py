"""Metadynamics inside the MD engine: the bias is in the compiled scan, hills are deposited there.

Checked against a hand-written jax-md loop (jax-md's own Langevin integrator on `model + bias`, hills
deposited by `jaxbench.metadynamics`), and the saved frames against NumPy (Gaussian sums) and ASE
(dihedral angles)."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxbench import md, metadynamics, trajectory
from jaxbench.errors import JaxbenchError

# a floppy 4-atom chain: Morse bonds, the torsion is free (the CV the bias pushes along)
CHAIN = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [2.0, 1.4, 0.0], [3.5, 1.5, 0.4]])
NUMBERS = [6, 6, 6, 6]
D, ALPHA, R0, RC = 1.0, 1.8, 1.5, 10.0  # cutoff far beyond the chain: the Morse switch never acts


def chain_energy(R):
    """All-pairs Morse in plain JAX (independent of the engine's graph and neighbour list)."""
    i, j = np.triu_indices(len(CHAIN), 1)
    r = jnp.linalg.norm(R[i] - R[j], axis=-1)
    x = jnp.exp(-ALPHA * (r - R0))
    return jnp.sum(D * (x * x - 2 * x))


def protocol(steps=400, **meta):
    settings = dict(dihedrals=[[0, 1, 2, 3]], height_kJ_mol=5.0, sigma_rad=0.3, pace_fs=10.0, bias_factor=4.0)
    settings.update(meta)
    return md.Protocol.from_dict(dict(ensemble="nvt_langevin", temperature_K=300.0, timestep_fs=0.5, steps=steps,
                                      replicas=2, friction_per_fs=0.02, save_every=20, chunk_steps=200,
                                      name="meta-test", metadynamics=settings)).validate()


def run(proto, tmp_path, name="t.h5"):
    jax.config.update("jax_enable_x64", True)
    model = md.morse(D=D, alpha=ALPHA, r0=R0, cutoff=RC)
    start = md.Start.make(CHAIN, NUMBERS, None, False, replicas=proto.replicas)
    return md.simulate(model, start, proto, seed=3, out=tmp_path / name, progress=False, keep_arrays=True)


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    proto = protocol()
    return proto, run(proto, tmp_path_factory.mktemp("meta"))


def test_engine_equals_a_hand_written_jax_md_loop(meta_run):
    from ase.data import atomic_masses
    from jax_md import simulate, space

    proto, res = meta_run
    meta = md.bias.metadynamics_of(proto, len(CHAIN))
    energy = metadynamics.biased_energy(lambda R, **kw: chain_energy(R), meta)
    _, shift = space.free()
    init_fn, apply_fn = simulate.nvt_langevin(energy, shift, dt=proto.dt, kT=proto.kT, gamma=proto.gamma)
    mass = np.asarray(atomic_masses[NUMBERS], np.float64)
    for r, key in enumerate(md.replica_keys(3, proto.replicas)):
        hills = metadynamics.init_hills(meta, jnp.float64)
        state = init_fn(key, jnp.asarray(CHAIN), mass=mass, kT=proto.kT, hills=hills)

        def step(c, k):
            state, hills = c
            state = apply_fn(state, hills=hills)
            return (state, metadynamics.maybe_deposit(meta, hills, state.position, k + 1)), None

        (state, hills), _ = jax.lax.scan(step, (state, hills), jnp.arange(proto.steps))
        assert int(res.hills["count"][r]) == proto.steps // meta.pace == int(hills.count) == 20
        np.testing.assert_allclose(res.hills["centers"][r], np.asarray(hills.centers), atol=1e-8)
        np.testing.assert_allclose(res.hills["heights"][r], np.asarray(hills.heights), rtol=1e-8)
        np.testing.assert_allclose(res.arrays["position"][r, -1], np.asarray(state.position), atol=1e-8)
    # the bias did something: well-tempered heights fall below the first as the bias builds up
    assert res.hills["heights"][:, -10:].mean() < 0.9 * res.hills["heights"][:, 0].mean()


def test_saved_frames_model_alone_and_bias_by_numpy(meta_run):
    from ase import Atoms

    proto, res = meta_run
    a = res.arrays
    meta = md.bias.metadynamics_of(proto, len(CHAIN))
    steps = a["step"]
    for r in range(proto.replicas):
        for t in (0, 7, len(steps) - 1):
            pos = a["position"][r, t]
            phi = np.deg2rad(Atoms("C4", positions=pos).get_dihedral(0, 1, 2, 3))
            assert np.angle(np.exp(1j * (a["cv"][r, t, 0] - phi))) == pytest.approx(0.0, abs=1e-9)
            n = int(steps[t]) // meta.pace  # hills deposited up to this frame
            d = np.angle(np.exp(1j * (a["cv"][r, t, 0] - res.hills["centers"][r, :n, 0]))) / meta.sigma[0]
            v = np.sum(res.hills["heights"][r, :n] * np.exp(-0.5 * d**2))
            assert a["bias_energy"][r, t] == pytest.approx(v, rel=1e-9, abs=1e-14)
            # potential energy and forces are the model's own, without the bias
            assert a["potential_energy"][r, t] == pytest.approx(float(chain_energy(jnp.asarray(pos))), rel=1e-9)
            np.testing.assert_allclose(a["force"][r, t], -np.asarray(jax.grad(chain_energy)(jnp.asarray(pos))),
                                       atol=1e-9)
        # each hill sits at the CV of the saved frame of its deposit step (pace is a multiple of save_every)
        frames = np.searchsorted(steps, meta.pace * np.arange(1, res.hills["count"][r] + 1))
        np.testing.assert_allclose(res.hills["centers"][r, :, 0], a["cv"][r, frames, 0], atol=1e-12)


def test_hills_and_cvs_are_in_the_trajectory_file(meta_run):
    proto, res = meta_run
    t = trajectory.read(res.path)
    for k in ("centers", "heights", "count"):
        np.testing.assert_array_equal(t["hills"][k], res.hills[k])
    np.testing.assert_array_equal(t["cv"], res.arrays["cv"])
    np.testing.assert_array_equal(t["bias_energy"], res.arrays["bias_energy"])
    assert t["info"]["protocol"]["metadynamics"]["pace_fs"] == 10.0


def test_resumed_metadynamics_keeps_its_hills(meta_run, tmp_path):
    """Killed after the first of two chunks (hills deposited in it) and resumed: frames, CVs, bias and
    hills are bit-identical to the uninterrupted run."""
    proto, res = meta_run
    model = md.morse(D=D, alpha=ALPHA, r0=R0, cutoff=RC)
    start = md.Start.make(CHAIN, NUMBERS, None, False, replicas=proto.replicas)

    def crash(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        md.simulate(model, start, proto, seed=3, out=tmp_path / "t.h5", progress=False, callback=crash)
    assert 0 < trajectory.read(tmp_path / "t.h5")["hills"]["count"][0] < res.hills["count"][0]
    md.simulate(model, start, proto, seed=3, out=tmp_path / "t.h5", progress=False, resume=True)
    a, b = trajectory.read(res.path), trajectory.read(tmp_path / "t.h5")
    for k in ("position", "velocity", "cv", "bias_energy", "conserved_energy"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in ("centers", "heights", "count"):
        np.testing.assert_array_equal(a["hills"][k], b["hills"][k])


def test_full_hill_buffer_is_an_error_and_the_file_stays_readable(tmp_path):
    proto = protocol(steps=400, max_hills=5)
    with pytest.raises(metadynamics.HillBufferFull, match="hill buffer"):
        run(proto, tmp_path)
    t = trajectory.read(tmp_path / "t.h5")
    assert len(t["step"]) == 200 // 20 + 1 and t["info"]["complete"] is False
    assert list(t["hills"]["count"]) == [5, 5]


def test_bad_metadynamics_settings_are_named():
    with pytest.raises(JaxbenchError, match="unknown keys \\['height'\\]"):
        protocol(height=1.0)
    with pytest.raises(JaxbenchError, match="pace_fs"):
        protocol(pace_fs=0.75)
    with pytest.raises(JaxbenchError, match="4 distinct atom indices"):
        protocol(dihedrals=[[0, 1, 1, 2]])
    with pytest.raises(JaxbenchError, match="beyond the system's 4"):
        md.bias.metadynamics_of(protocol(dihedrals=[[0, 1, 2, 7]]), 4)
    # a protocol round-trips through its dict (results.json, the H5MD metadata)
    p = protocol()
    assert md.Protocol.from_dict(p.to_dict()) == p
