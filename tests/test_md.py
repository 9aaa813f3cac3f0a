"""MD engine: integrators, thermostats, replicas, overflow, failures, differentiable rollouts."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxbench import md
from jaxbench.errors import DataError, JaxbenchError
from jaxbench.md.potentials import pair_r

A_FCC = 5.8  # Å: liquid argon density (rho sigma^3 ~ 0.81) at T* ~ 1
BASE = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def argon(n_cells: int, replicas: int = 1, jitter: float = 0.0, seed: int = 0):
    pos = np.array(
        [(b + np.array([i, j, k])) * A_FCC for i in range(n_cells) for j in range(n_cells) for k in range(n_cells) for b in BASE]
    )
    if jitter:
        pos = pos + np.random.default_rng(seed).normal(scale=jitter, size=pos.shape)
    return md.Start.make(pos, [18] * len(pos), np.eye(3) * n_cells * A_FCC, True, replicas=replicas)


LJ = md.lennard_jones(cutoff=7.0)


def proto(**kw):
    base = dict(ensemble="nve", temperature_K=120.0, timestep_fs=5.0, steps=200, replicas=1, save_every=10, chunk_steps=100)
    base.update(kw)
    return md.Protocol(**base)


# ------------------------------------------------------------------------------------------ input


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(temperature_K=0.0), "temperature"),
        (dict(temperature_K=-5.0), "temperature"),
        (dict(timestep_fs=0.0), "timestep"),
        (dict(timestep_fs=5.5), "timestep"),
        (dict(steps=0), "steps"),
        (dict(ensemble="npt"), "ensemble"),
        (dict(chunk_steps=15), "multiple"),
    ],
)
def test_protocol_rejects_nonphysical_values(kw, msg):
    with pytest.raises(JaxbenchError, match=msg):
        proto(**kw).validate()
    # and simulate refuses it before compiling anything
    with pytest.raises(JaxbenchError, match=msg):
        md.simulate(LJ, argon(1), proto(**kw), progress=False)


def test_bad_start_and_output_rejected(tmp_path):
    st = argon(1)
    pos = st.positions.copy()
    pos[0, 1] = pos[0, 0] + [0.05, 0, 0]
    with pytest.raises(DataError, match="overlapping atoms"):
        md.simulate(LJ, md.Start.make(pos[0], st.numbers, st.cell, True), proto(), progress=False)
    limited = md.EnergyModel(fn=LJ.fn, cutoff=LJ.cutoff, params=LJ.params, species=(1, 8), name="h2o-only")
    with pytest.raises(DataError, match="cannot represent Ar"):
        md.simulate(limited, st, proto(), progress=False)
    out = tmp_path / "exists.h5"
    out.write_text("")
    with pytest.raises(JaxbenchError, match="exists"):
        md.simulate(LJ, st, proto(), out=out, progress=False)
    assert out.read_text() == ""


def test_units():
    p = md.Protocol(timestep_fs=1.0, temperature_K=520.0, friction_per_fs=0.01, tau_fs=50.0)
    assert p.dt == pytest.approx(0.0982269, rel=1e-5)
    assert p.kT == pytest.approx(0.0448101, rel=1e-5)
    assert p.gamma == pytest.approx(0.1018051, rel=1e-5)
    assert p.tau == pytest.approx(50 / 10.1805057, rel=1e-6)


# ------------------------------------------------------------------------------------------ physics


def test_nve_conserves_energy_lj_liquid():
    """32 Ar atoms, force-shifted LJ, float64, 2 fs x 1500 steps = 3 ps: drift < 1e-5 eV/atom/ps."""
    st = argon(2, jitter=0.05)
    p = proto(ensemble="nve", timestep_fs=2.0, steps=1500, save_every=10, chunk_steps=500)
    res = md.simulate(LJ, st, p, seed=1, progress=False)
    a = res.arrays
    n = st.n_atoms
    t_ps = a["time"] / 1000.0
    e = a["conserved_energy"][0] / n
    slope = np.polyfit(t_ps, e, 1)[0]
    assert abs(slope) < 1e-5, slope
    assert np.ptp(e) < 2e-4  # no jumps either (a force-energy mismatch or overflow would show)
    # it really moved: the lattice melts, potential energy rises by far more than the tolerance
    assert np.ptp(a["potential_energy"][0]) / n > 5e-3
    assert np.all(a["temperature"][0] > 20)
    assert not res.failed.any() and res.steps_done == 1500
    # zero total momentum from the Maxwell–Boltzmann start, conserved by NVE
    mom = np.einsum("n,tnc->tc", a["mass"], a["velocity"][0])
    assert np.abs(mom).max() < 1e-10


@pytest.mark.parametrize("ensemble", ["nvt_nose_hoover", "nvt_langevin"])
def test_thermostat_holds_temperature(ensemble):
    """108 Ar atoms, 2 replicas, 5 fs x 3000 steps = 15 ps from a perfect lattice (without a
    thermostat it would equilibrate near T/2 by equipartition): mean T over the second half within
    5% (per replica the statistical error is ~2%)."""
    target = 120.0
    st = argon(3, replicas=2)
    p = proto(
        ensemble=ensemble, temperature_K=target, timestep_fs=5.0, steps=3000, replicas=2, save_every=20,
        chunk_steps=1500, tau_fs=200.0, friction_per_fs=0.01,
    )
    res = md.simulate(LJ, st, p, seed=3, progress=False)
    temp = res.arrays["temperature"]
    half = temp[:, temp.shape[1] // 2 :]
    assert not res.failed.any()
    assert abs(half.mean() / target - 1) < 0.05, half.mean(axis=1)
    assert np.all(np.abs(half.mean(axis=1) / target - 1) < 0.10), half.mean(axis=1)
    # the lattice start drops far below the target first (equipartition: NVE settles near T/2), so
    # the thermostat had real work to do and a broken one would fail the check above
    assert temp[:, : temp.shape[1] // 4].min() < 0.9 * target
    if ensemble == "nvt_nose_hoover":
        # the extended-system invariant is conserved while E = PE + KE is not
        a, n = res.arrays, st.n_atoms
        assert np.ptp(a["conserved_energy"], axis=1).max() / n < 5e-5
        assert np.ptp(a["potential_energy"] + a["kinetic_energy"], axis=1).min() / n > 5e-3


@pytest.mark.slow
@pytest.mark.parametrize("ensemble", ["nvt_nose_hoover", "nvt_langevin"])
def test_thermostat_20ps_every_replica(ensemble):
    """The issue's version: 20 ps (5 fs x 4000), 5 replicas, each within 5% over the second half."""
    target = 120.0
    p = proto(ensemble=ensemble, temperature_K=target, timestep_fs=5.0, steps=4000, replicas=5, save_every=20,
              chunk_steps=2000, tau_fs=200.0, friction_per_fs=0.01)
    res = md.simulate(LJ, argon(3, replicas=5), p, seed=5, progress=False)
    temp = res.arrays["temperature"]
    half = temp[:, temp.shape[1] // 2 :].mean(axis=1)
    assert np.all(np.abs(half / target - 1) < 0.05), half


def test_replicas_reproducible_independent_and_batching_modes():
    st3 = argon(2, replicas=3, jitter=0.02)
    p = proto(ensemble="nvt_langevin", steps=100, chunk_steps=50, replicas=3)
    res = md.simulate(LJ, st3, p, seed=7, progress=False)
    a = res.arrays
    assert res.devices == 2 and list(res.failed) == [False] * 3
    # same seeds: same trajectories, whether replicas are lax.map-ped or vmapped (batched step
    # with one outer rebuild cond, or a plain vmap of the per-replica chunk)
    # and whether they run on one device or are split over two (3 replicas: one padding copy)
    # (the default suite checks the vmap layout in test_failure_freezes_one_replica_others_go_on; every
    # layout and device count: test_batching_modes_give_the_same_trajectories, slow)
    # distinct replicas: different velocities from the start
    v0 = a["velocity"][:, 0]
    assert np.abs(v0[0] - v0[1]).max() > 1e-3 and np.abs(v0[1] - v0[2]).max() > 1e-3
    # Maxwell–Boltzmann at T with zero total momentum
    assert np.abs(np.einsum("n,rnc->rc", a["mass"], v0)).max() < 1e-10
    assert np.all(np.abs(a["temperature"][:, 0] / 120 - 1) < 0.5)
    # independence: changing replica 2's start changes nothing for replicas 0 and 1
    pos = st3.positions.copy()
    pos[2] = argon(2, jitter=0.05, seed=11).positions[0]
    c = md.simulate(LJ, md.Start.make(pos, st3.numbers, st3.cell, True), p, seed=7, progress=False).arrays
    np.testing.assert_allclose(c["position"][:2], a["position"][:2], atol=1e-9)
    assert np.abs(c["position"][2, -1] - a["position"][2, -1]).max() > 1e-3
    # given velocities (Å/fs) reproduce the seeded start exactly (unit round trip)
    stv = md.Start.make(st3.positions, st3.numbers, st3.cell, True, velocities=a["velocity"][:, 0])
    e = md.simulate(LJ, stv, p, seed=7, progress=False).arrays
    np.testing.assert_allclose(e["position"], a["position"], atol=1e-9)
    d = md.simulate(LJ, st3, p, seed=8, progress=False).arrays
    assert np.abs(d["position"][:, -1] - a["position"][:, -1]).max() > 1e-3


def test_a_run_compiles_its_chunk_once():
    """Its first chunk starts from arrays on one device, the next from the previous chunk's outputs, which
    are replicated over the 2-device mesh: both must hit one compiled program (jit keys on sharding)."""
    from .conftest import CompileCounter

    st = argon(2, replicas=2)
    p = proto(ensemble="nvt_langevin", temperature_K=97.5, steps=150, chunk_steps=50, capacity_multiplier=2.0)
    with CompileCounter() as c:
        res = md.simulate(LJ, st, p, seed=1, progress=False)
    assert res.devices == 2 and res.n_reallocations == 0 and res.steps_done == 150
    assert c["chunk"] == 1, c.counts


@pytest.mark.slow
@pytest.mark.parametrize("mode,devices", [("vmap", None), ("vmap_select", None), ("map", 1), ("vmap", 1)])
def test_batching_modes_give_the_same_trajectories(mode, devices):
    """Same seeds, same trajectories whether replicas are lax.map-ped or vmapped (batched step with one
    outer rebuild cond, or a plain vmap of the per-replica chunk), on one device or split over two
    (3 replicas: one padding copy)."""
    st3 = argon(2, replicas=3, jitter=0.02)
    p = proto(ensemble="nvt_langevin", steps=100, chunk_steps=50, replicas=3)
    a = md.simulate(LJ, st3, p, seed=7, progress=False).arrays
    assert len(jax.local_devices()) == 2
    b = md.simulate(LJ, st3, p, seed=7, progress=False, batch=mode, devices=devices).arrays
    assert b["position"].shape[0] == 3
    np.testing.assert_allclose(a["position"], b["position"], atol=1e-9)
    np.testing.assert_allclose(a["temperature"], b["temperature"], rtol=1e-9)


@pytest.mark.slow  # the re-allocate-and-rerun path: test_model_edge_overflow_... and the replicas test (default)
def test_neighbor_overflow_reallocates_and_reruns_chunk():
    """Capacity exactly the initial pair count, list radius (cutoff + skin = 7.0 Å) just inside the
    third FCC shell (7.10 Å): vibrations bring shell pairs in, the list overflows; the engine must
    re-allocate and redo the chunk, giving the same trajectory as a roomy list."""
    st = argon(2)
    lj = md.lennard_jones(cutoff=6.5)
    p = proto(ensemble="nve", temperature_K=200.0, steps=200, chunk_steps=50, capacity_multiplier=1.0)
    tight = md.simulate(lj, st, p, seed=2, progress=False)
    roomy = md.simulate(lj, st, p.replace(capacity_multiplier=3.0), seed=2, progress=False)
    assert tight.n_reallocations >= 1
    assert roomy.n_reallocations == 0
    assert tight.capacity > 0
    np.testing.assert_allclose(tight.arrays["position"], roomy.arrays["position"], atol=1e-7)
    np.testing.assert_allclose(tight.arrays["conserved_energy"], roomy.arrays["conserved_energy"], atol=1e-9)


def test_model_edge_overflow_reallocates_and_reruns_chunk():
    """With a skin the model sees only the pairs within the cutoff, in their own buffer. Cutoff 7.0 Å
    just inside the third FCC shell (7.10 Å), list radius 7.5 Å: the list has room for the third
    shell, the model's buffer (multiplier 1) does not; vibrations bring third-shell pairs inside the
    cutoff, the engine must re-allocate and redo the chunk (same trajectory as a roomy buffer)."""
    st = argon(2)
    lj = md.lennard_jones(cutoff=7.0)
    p = proto(ensemble="nve", temperature_K=200.0, steps=200, chunk_steps=50, capacity_multiplier=1.0)
    tight = md.simulate(lj, st, p, seed=2, progress=False)
    roomy = md.simulate(lj, st, p.replace(capacity_multiplier=3.0), seed=2, progress=False)
    assert tight.n_reallocations >= 1 and roomy.n_reallocations == 0
    # the first two shells (18 neighbours per atom) fill the model's buffer at the start (plus
    # (multiplier - 1) slots per atom), the first three (42) the list's
    assert roomy.edge_capacity == 3 * 18 * 32 + 2 * 32 and roomy.capacity == 3 * 42 * 32
    assert tight.edge_capacity < tight.capacity
    np.testing.assert_allclose(tight.arrays["position"], roomy.arrays["position"], atol=1e-9)
    np.testing.assert_allclose(tight.arrays["conserved_energy"], roomy.arrays["conserved_energy"], atol=1e-10)


# ------------------------------------------------------------------------------------------ failures


def exploding_second_replica():
    """Two argon replicas, the second with two atoms 1.6 Å apart (it explodes under LJ), and an NVE protocol."""
    st = argon(2, replicas=2)
    pos = st.positions.copy()
    pos[1, 1] = pos[1, 0] + [1.6, 0.0, 0.0]
    return md.Start.make(pos, st.numbers, st.cell, True), proto(ensemble="nve", steps=200, chunk_steps=100, timestep_fs=5.0)


def test_failure_freezes_one_replica_others_go_on():
    """Replica 1 starts with two atoms 1.6 Å apart under LJ: it explodes; replica 0 is untouched."""
    st2, p = exploding_second_replica()
    st, pos = st2, st2.positions
    res = md.simulate(LJ, st2, p, seed=0, progress=False)
    assert list(res.failed) == [False, True]
    k = int(res.failure_step[1])
    assert 0 <= k < 50
    assert res.failure_reason[1] & 3  # non-finite or temperature
    assert res.failure_step[0] == -1 and res.steps_done == 200
    a = res.arrays
    after = a["step"] >= k
    frozen = a["position"][1][after]
    assert np.all(np.isfinite(a["position"]))  # the frozen state is the last good one
    assert np.abs(frozen - frozen[0]).max() == 0.0
    # replica 0 does not notice its neighbor in the batch
    alone = md.simulate(LJ, md.Start.make(pos[:1], st.numbers, st.cell, True), p, seed=0, progress=False)
    np.testing.assert_allclose(alone.arrays["position"][0], a["position"][0], atol=1e-9)
    assert "FAILED" in res.summary()
    # the batched (vmap) layout freezes the same way
    res_v = md.simulate(LJ, st2, p, seed=0, progress=False, batch="vmap")
    assert list(res_v.failed) == [False, True] and res_v.failure_step[1] == k
    np.testing.assert_allclose(res_v.arrays["position"], a["position"], atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("batch", ["map", "vmap"])
def test_failure_freezes_the_same_on_one_device(batch):
    """Both layouts on one device freeze a failing replica as the default (two devices) does."""
    st2, p = exploding_second_replica()
    a = md.simulate(LJ, st2, p, seed=0, progress=False)
    one = md.simulate(LJ, st2, p, seed=0, progress=False, batch=batch, devices=1)
    assert list(one.failed) == [False, True] and one.failure_step[1] == a.failure_step[1]
    np.testing.assert_allclose(one.arrays["position"], a.arrays["position"], atol=1e-9)


def test_bond_criterion_for_molecules_and_failure_hook():
    # an H2 molecule under a purely repulsive pair energy: the bond stretches past 0.5 Å
    def repulsive(g):
        r, inside = pair_r(g, 4.0)
        return 0.5 * jnp.sum(jnp.where(inside, 2.0 / r**2, 0.0))

    st = md.Start.make([[0, 0, 0], [0.70, 0, 0]], [1, 1], None, False)
    p = proto(ensemble="nve", temperature_K=10.0, timestep_fs=0.5, steps=400, chunk_steps=200)
    res = md.simulate(repulsive, st, p, cutoff=4.0, progress=False)
    assert res.failed[0] and res.failure_reason[0] == 4, md.describe_failure(res.failure_reason[0])
    last = res.arrays["position"][0, -1]
    assert np.linalg.norm(last[1] - last[0]) - 0.70 <= 0.5  # frozen at the last good state
    assert np.linalg.norm(last[1] - last[0]) - 0.70 > 0.3  # one step (~0.18 Å) before the threshold
    assert 0 < res.failure_step[0] < 100

    # periodic: a user hook (here: an atom displaced by more than 0.3 Å from its start)
    st = argon(1)
    x0 = jnp.asarray(st.positions[0])
    hook = lambda s: jnp.max(jnp.linalg.norm(s.position - x0, axis=-1)) > 0.3  # noqa: E731
    res = md.simulate(LJ, st, proto(steps=300, chunk_steps=100, temperature_K=300), failure_fn=hook, progress=False)
    assert res.failed[0] and res.failure_reason[0] == 8
    assert res.failure_step[0] % 10 == 0  # hooks run at saved frames
    assert np.all(res.arrays["position"][0, res.arrays["step"] >= res.failure_step[0]] == res.arrays["position"][0, -1])
    with pytest.raises(JaxbenchError, match="failure_fn must be"):
        md.simulate(LJ, st, proto(steps=300, chunk_steps=100), failure_fn=0.3, progress=False)


@pytest.mark.parametrize("batch", ["map", pytest.param("vmap", marks=pytest.mark.slow)])
def test_rdf_stability_hook_in_engine_matches_post_hoc(batch):
    """FaNE's windowed RDF criterion inside the compiled rollout (metrics.rdf_stability_hook) dates
    each replica's failure at the same frame as metrics.stability_rdf on the saved frames, freezes it
    there, and leaves a replica that stays below the threshold running."""
    from jaxbench import metrics as M

    st = argon(2, replicas=2, jitter=0.05)
    p = proto(ensemble="nvt_nose_hoover", temperature_K=250.0, timestep_fs=5.0, steps=600, chunk_steps=100, save_every=5)
    r_max, dr, window = 5.0, 0.1, 10
    free = md.simulate(LJ, st, p, seed=3, progress=False)
    cell = st.cell
    _, g_ref = M.rdf(free.arrays["position"][0, :3], cell, True, st.numbers, r_max, dr)
    g_frames = [np.asarray(M.rdf_frames(free.arrays["position"][k], cell, True, st.numbers, r_max, dr)[1]) for k in range(2)]
    T = g_frames[0].shape[0]
    c = [np.concatenate([np.zeros_like(g[:1]), np.cumsum(g, 0)]) for g in g_frames]
    devs = [np.asarray(M.rdf_mae((ck[window:] - ck[:-window]) / window, g_ref, dr)) for ck in c]
    # a threshold that replica 0 first exceeds mid-run and replica 1 never does (if its devs allow)
    threshold = float(np.max(devs[0][: len(devs[0]) // 3])) + 1e-9
    assert np.any(devs[0] > threshold)
    expect = [int(M.stability_rdf(g, g_ref, dr, window, threshold)) for g in g_frames]
    assert 0 < expect[0] < T - window

    hook = M.rdf_stability_hook(g_ref, cell, True, st.numbers, r_max, dr, window, threshold)
    res = md.simulate(LJ, st, p, seed=3, failure_fn=hook, progress=False, batch=batch)
    for k in range(2):
        if expect[k] >= T - window + 1:
            assert not res.failed[k]
            continue
        assert res.failed[k] and res.failure_reason[k] == 8, (batch, k, md.describe_failure(res.failure_reason[k]))
        assert res.failure_step[k] == expect[k] * p.save_every, (batch, k, res.failure_step[k], expect[k])
        detect = expect[k] + window - 1  # frame at which the window ending there was judged
        pos = res.arrays["position"][k]
        np.testing.assert_allclose(pos[: detect + 1], free.arrays["position"][k, : detect + 1], atol=1e-8)
        assert np.all(pos[detect:] == pos[detect])  # frozen at the judged state
        # the post hoc criterion on the hooked run's own frames agrees
        gk = np.asarray(M.rdf_frames(pos[: detect + 1], cell, True, st.numbers, r_max, dr)[1])
        assert int(M.stability_rdf(gk, g_ref, dr, window, threshold)) == expect[k]


# ------------------------------------------------------------------------------------------ gradients


def test_rollout_gradient_matches_finite_differences():
    """5-atom LJ cluster (all pairs inside the cutoff), NVE, 60 steps, float64: grad of the mean
    potential energy w.r.t. (epsilon, sigma) and initial positions vs central differences."""
    x0 = np.array([[0.0, 0.0, 0.0], [3.8, 0.0, 0.0], [1.9, 3.3, 0.0], [1.9, 1.1, 3.1], [0.3, 2.0, -2.9]])
    v0 = np.random.default_rng(0).normal(scale=2e-3, size=x0.shape)  # Å/fs
    v0 -= v0.mean(0)
    lj = md.lennard_jones(cutoff=12.0)
    p = md.Protocol(ensemble="nve", temperature_K=50.0, timestep_fs=4.0, steps=60, save_every=5, chunk_steps=10)
    roll = md.make_rollout(lj, [18] * 5, None, False, p, x0, chunk_steps=10)

    def loss_aux(params, x):
        out = roll(params, x, jnp.asarray(v0))
        return jnp.mean(out["potential_energy"]) + 0.01 * jnp.sum(out["positions"][-1] ** 2) / 100, out["did_overflow"]

    def loss(params, x):
        return loss_aux(params, x)[0]

    params = {k: jnp.asarray(v, jnp.float64) for k, v in lj.params.items()}
    x = jnp.asarray(x0)
    (g_p, g_x), overflow = jax.jit(jax.grad(loss_aux, argnums=(0, 1), has_aux=True))(params, x)
    assert not bool(overflow)
    f = jax.jit(loss)
    for k, h in (("epsilon", 1e-6), ("sigma", 1e-5)):
        up = dict(params, **{k: params[k] + h})
        dn = dict(params, **{k: params[k] - h})
        fd = (f(up, x) - f(dn, x)) / (2 * h)
        np.testing.assert_allclose(float(g_p[k]), float(fd), rtol=1e-5)
    for i, c in ((0, 0), (3, 2), (4, 1)):
        h = 1e-5
        e = jnp.zeros_like(x).at[i, c].set(h)
        fd = (f(params, x + e) - f(params, x - e)) / (2 * h)
        np.testing.assert_allclose(float(g_x[i, c]), float(fd), rtol=1e-5, atol=1e-9)
    assert float(jnp.abs(g_x).max()) > 1e-4  # non-trivial gradient

    # chunks are rematerialized: the backward pass holds a checkpoint (remat) per chunk
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, x))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    roll_plain = md.make_rollout(lj, [18] * 5, None, False, p, x0, chunk_steps=10, remat=False)
    jaxpr_plain = str(jax.make_jaxpr(jax.grad(lambda pp: jnp.mean(roll_plain(pp, x, jnp.asarray(v0))["potential_energy"])))(params))
    assert "checkpoint" not in jaxpr_plain and "remat" not in jaxpr_plain


# ------------------------------------------------------------------------------------------ cards, CLI, models


def test_protocol_cards_match_papers():
    from jaxbench import data

    for name, spec in data.datasets().items():
        try:
            p = md.load_protocol("egraffbench", name)
        except JaxbenchError:
            continue
        sim = spec.simulation
        assert p.temperature_K == sim["temperature_K"][0] and p.timestep_fs == sim["timestep_fs"][0], name
        assert (p.steps, p.replicas, p.ensemble) == (1000, 5, "nvt_nose_hoover")
    assert md.load_protocol("egraffbench", "lips20-P2S5").temperature_K == 3000  # family entry
    # out-of-distribution 600 K runs (Table 10's second temperature): 3bpa 1.0 fs, acac 0.5 fs
    for name in ("3bpa", "acac"):
        sim = data.datasets()[name].simulation
        p300, p600 = md.load_protocol("egraffbench", name), md.load_protocol("egraffbench-600k", name)
        assert (p300.temperature_K, p600.temperature_K) == tuple(sim["temperature_K"]) == (300, 600), name
        assert p600.timestep_fs == sim["timestep_fs"][-1] and p300.timestep_fs == sim["timestep_fs"][0], name
        assert (p600.steps, p600.replicas, p600.ensemble, p600.chain_length) == (1000, 5, "nvt_nose_hoover", 3)
        # the start frames come from a split the dataset has, at the run's temperature where it has one
        assert p300.frame_split in data.datasets()[name].splits and p600.frame_split in data.datasets()[name].splits
    assert md.load_protocol("egraffbench-600k", "acac").timestep_fs == 0.5
    assert (md.load_protocol("egraffbench", "3bpa").frame_split, md.load_protocol("egraffbench-600k", "3bpa").frame_split) == (
        "test_300K", "test_600K")
    with pytest.raises(JaxbenchError, match="no entry"):
        md.load_protocol("egraffbench-600k", "md17-ethanol")
    for ds, t, dt, ps in [("md17-ethanol", 500, 0.5, 300), ("md17-aspirin", 500, 0.5, 300), ("lips", 520, 0.25, 50)]:
        p = md.load_protocol("forces-not-enough", ds)
        assert (p.temperature_K, p.timestep_fs, p.ensemble) == (t, dt, "nvt_nose_hoover")
        assert p.steps * p.timestep_fs == ps * 1000
    with pytest.raises(JaxbenchError, match="no entry"):
        md.load_protocol("forces-not-enough", "gete")
    with pytest.raises(KeyError, match="unknown protocol card"):
        md.load_protocol("egraffbenhc")


def test_potential_species_checked_before_compute():
    from jaxbench.potential import Potential
    from jaxbench.stats import DatasetStatistics

    stats = DatasetStatistics(species=(1, 6, 8), atomic_energies={1: 0.0, 6: 0.0, 8: 0.0}, energy_per_atom_mean=0.0,
                              energy_per_atom_std=1.0, force_rms=1.0, avg_num_neighbors=8.0, cutoff=5.0, n_frames=1)
    pot = Potential.from_card("nequip-small", stats)
    with pytest.raises(DataError, match="cannot represent Ar"):
        md.simulate(pot, argon(1), proto(), params={"not": "used"}, progress=False)


@pytest.mark.slow
def test_random_nequip_potential_runs_and_failures_are_results():
    """A Potential with random parameters (nequip-small) on ethanol: the run completes, values are
    finite, and the (unphysical) model's bond breaking is reported per replica, not raised."""
    from ase.build import molecule

    from jaxbench.graph import graph_from_atoms
    from jaxbench.potential import Potential, cast_params
    from jaxbench.stats import DatasetStatistics

    atoms = molecule("CH3CH2OH")
    stats = DatasetStatistics(species=(1, 6, 8), atomic_energies={1: -13.6, 6: -1029.0, 8: -2041.0},
                              energy_per_atom_mean=0.0, energy_per_atom_std=1.0, force_rms=1.0, avg_num_neighbors=8.0,
                              cutoff=5.0, n_frames=1)
    pot = Potential.from_card("nequip-small", stats)
    params = cast_params(pot.init(jax.random.PRNGKey(0), graph_from_atoms(atoms, 5.0)), jnp.float64)
    st = md.Start.make(atoms.positions, atoms.numbers, None, False, replicas=2)
    p = md.Protocol(ensemble="nve", temperature_K=300, timestep_fs=0.25, steps=100, save_every=10, chunk_steps=50)
    res = md.simulate(pot, st, p, params=params, progress=False)
    a = res.arrays
    assert np.all(np.isfinite(a["position"])) and np.all(np.isfinite(a["potential_energy"]))
    # conservative forces: total energy conserved while the replica is not frozen
    e = a["conserved_energy"]
    assert np.abs(e[:, 1:3] - e[:, :1]).max() < 1e-3
    assert res.steps_done == 100 or res.failed.all()
    # a differentiable rollout of the Potential traces (shapes only: compiling it is slow)
    roll = md.make_rollout(pot, atoms.numbers, None, False, p.replace(steps=20), atoms.positions, chunk_steps=10)
    v = jnp.zeros_like(jnp.asarray(atoms.positions))
    g = jax.eval_shape(jax.grad(lambda pp: jnp.mean(roll(pp, jnp.asarray(atoms.positions), v)["potential_energy"])), params)
    assert jax.tree.structure(g) == jax.tree.structure(params)


def test_cli_simulate(data_root, tmp_path, capsys):
    from jaxbench.cli import main

    out = tmp_path / "sim"
    argv = ["simulate", "jaxbench.md:morse", "--dataset", "md17-ethanol", "--steps", "40", "--replicas", "2",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    from jaxbench import trajectory

    tr = trajectory.read(out / "trajectory.h5")
    assert tr["position"].shape == (2, 5, 9, 3) and list(tr["step"]) == [0, 10, 20, 30, 40]
    assert tr["info"]["protocol"]["temperature_K"] == 500 and tr["info"]["protocol"]["timestep_fs"] == 0.5
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "md17-ethanol" and len(summary["failed"]) == 2
    capsys.readouterr()
    # refusals happen before any compute, with a clear message and exit status 2
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert main(argv[:-1] + ["--overwrite", "--temperature", "-3", "--quiet"]) == 2
    assert "temperature must be > 0" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--timestep", "7"]) == 2
    assert "timestep" in capsys.readouterr().err


@pytest.mark.slow  # the criterion in the engine: test_rdf_stability_hook_in_engine_matches_post_hoc (default)
def test_cli_simulate_rdf_stability(data_root, tmp_path, capsys):
    """`--rdf-stability` puts FaNE's RDF criterion (reference: LiPS's test frames) into the engine: with
    Delta = 0 both replicas fail at their first full window, dated at its start."""
    import json

    from jaxbench.cli import main

    out = tmp_path / "sim"
    argv = ["simulate", "jaxbench.md:morse", "--dataset", "lips", "--steps", "40", "--replicas", "2", "--out", str(out),
            "--quiet", "--rdf-stability", "--rdf-window-fs", "20", "--rdf-threshold", "0"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [True, True] and summary["failure_step"] == [0, 0]
    assert all("structural" in r for r in summary["failure_reason"])
    capsys.readouterr()
    assert main(argv[:-4] + ["--overwrite", "--rdf-window-fs", "1000"]) == 2  # 1 ps window, 40 fs run
    assert "window" in capsys.readouterr().err
    argv_mol = ["simulate", "jaxbench.md:morse", "--dataset", "md17-ethanol", "--steps", "20", "--out", str(tmp_path / "m"),
                "--quiet", "--rdf-stability"]
    assert main(argv_mol) == 2 and "not periodic" in capsys.readouterr().err


def _fake_run(tmp_path, species, init_atoms=None):
    """A run directory as the training code writes it, with random nequip-small parameters."""
    import json

    from jaxbench import runs
    from jaxbench.potential import Potential, model_card
    from jaxbench.stats import DatasetStatistics

    run = tmp_path / "run"
    run.mkdir()
    stats = DatasetStatistics(species=tuple(species), atomic_energies={z: 0.0 for z in species}, energy_per_atom_mean=0.0,
                              energy_per_atom_std=1.0, force_rms=1.0, avg_num_neighbors=8.0, cutoff=5.0, n_frames=1)
    card = model_card("nequip-small")
    (run / "card.json").write_text(json.dumps(card))
    (run / "statistics.json").write_text(stats.dumps())
    (run / "dataset.json").write_text(json.dumps({"name": "md17-ethanol"}))
    params = {"params": {}}
    if init_atoms is not None:
        from jaxbench.graph import graph_from_atoms

        pot = Potential.from_card(card, stats)
        params = pot.init(jax.random.PRNGKey(0), graph_from_atoms(init_atoms, 5.0))
    runs.save_checkpoint(run, "best", {"params": params}, {})
    return run


def test_cli_run_directory_species_refused_before_compute(data_root, tmp_path, capsys):
    from jaxbench.cli import main

    run = _fake_run(tmp_path, (1, 6))  # no oxygen
    rc = main(["simulate", str(run), "--dataset", "md17-ethanol", "--steps", "20", "--quiet"])
    assert rc == 2
    assert "cannot represent O" in capsys.readouterr().err
    assert not (run / "md").exists()


@pytest.mark.slow
def test_cli_run_directory_simulates(data_root, tmp_path):
    from ase.build import molecule

    from jaxbench import trajectory
    from jaxbench.cli import main

    run = _fake_run(tmp_path, (1, 6, 8), init_atoms=molecule("CH3CH2OH"))
    assert main(["simulate", str(run), "--dataset", "md17-ethanol", "--steps", "20", "--replicas", "2", "--quiet"]) == 0
    tr = trajectory.read(run / "md" / "egraffbench_md17-ethanol" / "trajectory.h5")
    assert tr["position"].shape == (2, 3, 9, 3)


@pytest.mark.slow
@pytest.mark.parametrize("card", ["mace-small", "nequip-small"])
def test_rollout_gradient_through_potential_matches_finite_differences(card):
    """A real equivariant Potential (random weights, float64) in a 20-step NVE rollout of ethanol:
    jax.grad of the mean potential energy w.r.t. model parameters and initial positions vs central
    finite differences (through integrator, neighbor list updates and the remat'ed chunks)."""
    from ase.build import molecule

    from jaxbench.graph import graph_from_atoms
    from jaxbench.potential import Potential, cast_params
    from jaxbench.stats import DatasetStatistics

    atoms = molecule("CH3CH2OH")
    stats = DatasetStatistics(species=(1, 6, 8), atomic_energies={1: -13.6, 6: -1029.0, 8: -2041.0},
                              energy_per_atom_mean=0.0, energy_per_atom_std=1.0, force_rms=0.5, avg_num_neighbors=8.0,
                              cutoff=5.0, n_frames=1)
    pot = Potential.from_card(card, stats)
    params = cast_params(pot.init(jax.random.PRNGKey(1), graph_from_atoms(atoms, 5.0)), jnp.float64)
    p = md.Protocol(ensemble="nve", temperature_K=300.0, timestep_fs=0.5, steps=20, save_every=10, chunk_steps=10)
    roll = md.make_rollout(pot, atoms.numbers, None, False, p, atoms.positions, chunk_steps=10)
    v0 = np.random.default_rng(0).normal(scale=5e-3, size=atoms.positions.shape)  # Å/fs, ~300 K for H
    v0 = jnp.asarray(v0 - v0.mean(0))

    def loss_aux(params, x):
        out = roll(params, x, v0)
        return jnp.mean(out["potential_energy"]), out

    loss = jax.jit(lambda pp, x: loss_aux(pp, x)[0])
    x = jnp.asarray(atoms.positions)
    (g_p, g_x), out = jax.jit(jax.grad(loss_aux, argnums=(0, 1), has_aux=True))(params, x)
    assert not bool(out["did_overflow"])
    # the rollout moved: positions changed by more than the finite-difference step by far
    assert float(jnp.abs(out["positions"][-1] - x).max()) > 1e-3
    leaves, treedef = jax.tree.flatten(params)
    g_leaves = jax.tree.leaves(g_p)
    checked = 0
    for li in np.argsort([-np.abs(np.asarray(g)).max() for g in g_leaves])[:3]:  # leaves with real gradient
        flat_idx = int(np.argmax(np.abs(np.asarray(g_leaves[li])).ravel()))
        h = 1e-5 * max(1.0, float(np.abs(np.asarray(leaves[li]).ravel()[flat_idx])))

        def shifted(d, li=li, flat_idx=flat_idx):
            new = list(leaves)
            new[li] = leaves[li].ravel().at[flat_idx].add(d).reshape(leaves[li].shape)
            return jax.tree.unflatten(treedef, new)

        fd = (loss(shifted(h), x) - loss(shifted(-h), x)) / (2 * h)
        np.testing.assert_allclose(float(g_leaves[li].ravel()[flat_idx]), float(fd), rtol=1e-5)
        checked += 1
    assert checked == 3
    for i, c in ((0, 0), (2, 1), (8, 2)):
        h = 1e-5
        e = jnp.zeros_like(x).at[i, c].set(h)
        fd = (loss(params, x + e) - loss(params, x - e)) / (2 * h)
        np.testing.assert_allclose(float(g_x[i, c]), float(fd), rtol=1e-5, atol=1e-8)
    assert float(jnp.abs(g_x).max()) > 1e-3


@pytest.mark.slow
def test_float32_model_with_float64_integration_is_safe():
    """Model evaluation in float32 (params cast to float32: Potential evaluates in the params' dtype)
    with float64 integration: the trajectory stays within 1e-3 Å of the float64 one over 40 steps
    (forces are fine), and potential / conserved energies agree to float32 resolution of the TOTAL
    energy. With atomic reference energies of -1000s of eV that resolution is ~1e-3 eV for ethanol:
    too coarse for energy-violation metrics (EV ~ 1e-5 relative), so keep float64 for those runs; it
    is what md_throughput --dtype float32 trades for speed."""
    from ase.build import molecule

    from jaxbench.graph import graph_from_atoms
    from jaxbench.potential import Potential, cast_params
    from jaxbench.stats import DatasetStatistics

    atoms = molecule("CH3CH2OH")
    stats = DatasetStatistics(species=(1, 6, 8), atomic_energies={1: -13.6, 6: -1029.0, 8: -2041.0},
                              energy_per_atom_mean=0.0, energy_per_atom_std=1.0, force_rms=0.05, avg_num_neighbors=8.0,
                              cutoff=5.0, n_frames=1)
    pot = Potential.from_card("mace-small", stats)
    p32 = pot.init(jax.random.PRNGKey(0), graph_from_atoms(atoms, 5.0), dtype=jnp.float32)
    p64 = cast_params(p32, jnp.float64)  # the same weights
    st = md.Start.make(atoms.positions, atoms.numbers, None, False)
    # random weights: no real bonds, so the bond-stretch criterion is off (bond_factor 0)
    p = md.Protocol(ensemble="nve", temperature_K=300, timestep_fs=0.5, steps=40, save_every=5, chunk_steps=40, bond_factor=0.0)
    res64 = md.simulate(pot, st, p, params=p64, seed=0, progress=False)
    res32 = md.simulate(pot, st, p, params=p32, seed=0, progress=False)
    r64, r32 = res64.arrays, res32.arrays
    assert not res64.failed.any() and not res32.failed.any()
    assert r32["position"].dtype == np.float64  # integration state stays float64
    assert np.abs(r32["position"] - r64["position"]).max() < 1e-3
    assert np.abs(r64["position"][0, -1] - r64["position"][0, 0]).max() > 1e-2  # it moved
    e32, e64 = r32["conserved_energy"][0], r64["conserved_energy"][0]
    resolution = np.finfo(np.float32).eps * np.abs(e64).max()  # ~5e-4 eV at -4180 eV
    assert np.abs(e32 - e64).max() < 8 * resolution
    assert np.ptp(e64) < 1e-4  # float64 conserves far below the float32 resolution
