"""FaNE's two systems through `jaxbench bench`: generated data, a small model, the FaNE protocols.

The end-to-end runs are marked slow (each trains a model and runs the OpenMM reference); the pieces
they rely on have fast tests here: the starts at the free-energy minima, the per-element-pair RDF
criterion, fixed-length MSD windows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxbench import md
from jaxbench.frames import Frames
from jaxbench.scoring import BenchSettings, diffusivity_per_element


def test_fane_cards_load_with_their_scoring():
    water = md.load_protocol("fane-water", "water-1k")
    assert (water.steps, water.replicas, water.timestep_fs) == (500_000, 5, 1.0)
    assert md.load_protocol("fane-water", "water-512").steps == 150_000
    s = BenchSettings.from_protocol(water)
    assert (s.rdf_stability_threshold, s.rdf_stability_pairs, s.msd_window_fs) == (3.0, "all", 100_000)
    ala = md.load_protocol("fane-alanine", "alanine-dipeptide")
    assert (ala.steps * ala.timestep_fs, ala.replicas, ala.replica_init) == (5e6, 6, "fes_minima")
    m = ala.metadynamics
    assert (m.height_kJ_mol, m.sigma_rad, m.pace_fs) == (1.2, 0.35, 1000)
    with pytest.raises(Exception, match="scoring: unknown keys \\['rdf_treshold'\\]"):
        BenchSettings.from_protocol(water.replace(scoring=(("rdf_treshold", 1.0),)))


def test_fes_minima_starts_are_the_frames_nearest_each_basin():
    """Frames sampled around three (phi, psi) basins of a 4-atom chain: one start per basin, deepest first."""
    from jaxbench.metadynamics import dihedral
    from jaxbench.stages import fes_minima_starts

    rng = np.random.default_rng(0)
    basins = [(-1.4, 2.6, 400), (-1.4, -0.7, 250), (1.0, 0.5, 100)]

    def chain(phi, psi):  # 5 atoms: dihedral (0,1,2,3) = phi, (1,2,3,4) = psi
        x = [np.array([0.0, 1.0, 0.0]), np.zeros(3), np.array([1.5, 0.0, 0.0])]
        for ang in (phi, psi):
            b, c = x[-2], x[-1]
            u = (c - b) / np.linalg.norm(c - b)
            a = x[-3] - b
            perp = a - a.dot(u) * u
            perp /= np.linalg.norm(perp)
            w = np.cross(u, perp)
            # rotating perp by the dihedral about the bond, pointing back along -u a little
            d = np.cos(ang) * perp - np.sin(ang) * w
            x.append(c + 1.5 * (0.3 * u + 0.95 * d))
        return np.stack(x)

    pos = []
    for phi0, psi0, n in basins:
        for _ in range(n):
            pos.append(chain(phi0 + 0.2 * rng.standard_normal(), psi0 + 0.2 * rng.standard_normal()))
    pos = np.stack(pos)
    import jax.numpy as jnp

    cv = np.array([[float(dihedral(*jnp.asarray(p[[0, 1, 2, 3]]))), float(dihedral(*jnp.asarray(p[[1, 2, 3, 4]])))]
                   for p in pos])
    frames = Frames.from_arrays(pos, np.full(5, 6), energy=np.zeros(len(pos)), validate=False)
    proto = md.Protocol(replicas=3, replica_init="fes_minima", metadynamics=md.MetadynamicsSettings(
        dihedrals=((0, 1, 2, 3), (1, 2, 3, 4))))
    start = fes_minima_starts(frames, proto)
    got = cv[list(start.frame_indices)]
    first = np.cumsum([0] + [n for *_, n in basins])
    for b, (phi, psi) in enumerate(got):  # the basins' measured centres, most populated first
        centre = np.angle(np.exp(1j * cv[first[b]:first[b + 1]]).mean(axis=0))
        assert np.all(np.abs(np.angle(np.exp(1j * (np.array([phi, psi]) - centre)))) < 0.3), (b, phi, psi, centre)
    np.testing.assert_array_equal(start.positions, pos[list(start.frame_indices)])


def test_fixed_msd_windows_recover_a_random_walk_and_skip_short_runs():
    """Brownian particles with D known: 100-frame windows give D; a replica stable for less than the
    required time gets no value."""
    rng = np.random.default_rng(1)
    dt_frame, D_A2_fs = 10.0, 0.02  # fs, Å²/fs  (= 2e-5 cm²/s... x 1e-1: 1 Å²/fs = 0.1 cm²/s)
    T, N = 1001, 400
    steps = rng.standard_normal((2, T, N, 3)) * np.sqrt(2 * D_A2_fs * dt_frame)
    pos = np.cumsum(steps, axis=1)
    traj = {"position": pos, "cell": np.eye(3) * 1000.0, "pbc": np.zeros(3, bool)}
    species = np.full(N, 8)
    s = BenchSettings(msd_window_fs=1000.0, msd_min_stable_fs=5000.0, msd_equilibration_fraction=0.0)
    out = diffusivity_per_element(traj, np.array([T, 300]), dt_frame, s, species)["O"]
    assert out["per_replica"][1] is None  # 300 frames = 2990 fs < 5000 fs
    assert out["per_replica"][0] == pytest.approx(D_A2_fs * 0.1, rel=0.1)


# ------------------------------------------------------------------------------------------------
# end to end (slow): `jaxbench data generate` -> bench with the short FaNE protocols
# ------------------------------------------------------------------------------------------------
def small_schnet(r_max=None):
    from jaxbench.potential import model_card

    card = model_card("schnet")
    card["name"] = "schnet-fane-test"
    card["hyperparameters"].update(n_atom_basis=16, n_filters=16, n_interactions=1, n_rbf=16)
    if r_max:
        card["hyperparameters"]["r_max"] = r_max
    card["training"].update(batch_size=4, valid_batch_size=8, learning_rate=0.005)
    return card


@pytest.mark.slow
def test_alanine_metadynamics_bench_end_to_end(tmp_path, monkeypatch):
    import jax

    from jaxbench.data import ENV_DATA_DIR

    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path))  # where `jaxbench data generate` writes, as a user sets it
    jax.config.update("jax_enable_x64", True)
    from jaxbench import generate
    from jaxbench.bench import bench

    g = generate.generate("alanine-dipeptide", frames=60, seed=0, data_dir=tmp_path, equil_ps=0.5, frame_every_ps=0.2)
    proto = md.load_protocol("fane-alanine-short", "alanine-dipeptide").replace(steps=2000, replicas=2)
    r = bench(small_schnet(), g["dataset"], tmp_path / "b", protocol=proto, train_budget="20s", max_epochs=2,
              data_dir=tmp_path, progress=False, n_test=10)
    fe = r["free_energy"]
    assert fe["runs"] == 2 and fe["hills_per_replica"] == [20, 20] or fe["finished_runs"] < 2
    if fe["finished_runs"]:
        assert fe["mae_kJ_mol"]["F(phi)"]["mean"] > 0 and np.isfinite(fe["mae_kJ_mol"]["F(psi)"]["mean"])
        assert (tmp_path / "b" / "ramachandran.png").is_file()
    assert r["simulation"]["speed"]["steps_per_s"] > 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["free_energy"]["runs"] == 2
    assert np.load(tmp_path / "b" / "reference_fes.npz")["fes_eV"].shape == (2, 72, 72)


@pytest.mark.slow
def test_free_energy_score_of_a_finished_metadynamics_run(tmp_path, monkeypatch):
    """An elastic network of alanine dipeptide (bonds and 1-3 pairs harmonic, torsions free) runs the
    short FaNE metadynamics to the end from the dataset's FES minima; its F(phi), F(psi) are scored against
    OpenMM's metadynamics of the real force field: finite, and far from zero (no torsional barriers)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from jaxbench import data, generate, stages, trajectory
    from jaxbench.data import ENV_DATA_DIR
    from jaxbench.metrics import covalent_bonds

    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path))
    g = generate.generate("alanine-dipeptide", frames=60, seed=0, data_dir=tmp_path, equil_ps=0.5, frame_every_ps=0.2)
    spec = data.get(g["dataset"])
    frames = data.load(g["dataset"], "train")
    x0 = frames.frame(0)["positions"]
    b = covalent_bonds(x0, frames.frame(0)["numbers"])
    nb = {i: set() for i in range(len(x0))}
    for i, j in b:
        nb[i].add(j)
        nb[j].add(i)
    pairs = {tuple(sorted(p)) for p in map(tuple, b)} | {tuple(sorted((i, k))) for j in nb for i in nb[j] for k in nb[j] if i != k}
    pi, pj = np.array(sorted(pairs)).T
    d0 = np.linalg.norm(x0[pi] - x0[pj], axis=1)

    def network(graph):
        x = graph.positions[: len(x0)]
        return jnp.sum(20.0 * (jnp.linalg.norm(x[pi] - x[pj], axis=1) - d0) ** 2)

    proto = md.load_protocol("fane-alanine-short", "alanine-dipeptide").replace(steps=4000, replicas=2)
    start = stages.replica_starts(frames, proto, None)
    sim = md.simulate(md.as_energy_model(network, cutoff=3.0), start, proto, seed=0, out=tmp_path / "t.h5", progress=False)
    assert not sim.failed.any() and list(sim.hills["count"]) == [40, 40]
    fe = stages.score_free_energy(start, trajectory.read(sim.path), sim.failed, spec, proto, seed=0, out=tmp_path)
    s = fe.section
    assert s["finished_runs"] == 2
    for k in ("F(phi)", "F(psi)"):
        assert all(v is not None and 0.5 < v < 100 for v in s["mae_kJ_mol"][k]["per_replica"]), s["mae_kJ_mol"]
    assert fe.arrays["reference_fes_eV"].shape == (72, 72)
    print(s["mae_kJ_mol"])
    # scored again (a re-run benchmark): the stored reference surfaces are reused, not recomputed
    import jaxbench.generate.openmm_metad as om

    def no_openmm(*a, **k):
        raise AssertionError("the reference metadynamics ran again")

    monkeypatch.setattr(om, "reference_metadynamics", no_openmm)
    again = stages.score_free_energy(start, trajectory.read(sim.path), sim.failed, spec, proto, seed=0, out=tmp_path)
    assert again.section["mae_kJ_mol"] == s["mae_kJ_mol"]
    with pytest.raises(AssertionError, match="ran again"):  # another seed is another reference
        stages.score_free_energy(start, trajectory.read(sim.path), sim.failed, spec, proto, seed=1, out=tmp_path)


def _water_like_box(rng, L: float):
    """8 O + 16 H on a jittered 3x3x3 grid of a cubic box of side L: (cell, pbc, species, positions [24, 3])."""
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3) * L / 3
    base = grid[rng.permutation(27)[:24]] + 0.3 * rng.standard_normal((24, 3))
    return np.eye(3) * L, np.ones(3, bool), np.array([8] * 8 + [1] * 16), base


def test_water_rdf_criterion_fires_on_one_element_pair():
    """A hand-made jump: from frame 12 the H atoms pair up at 0.75 Å (H2), O-O and O-H stay as they were.
    The in-engine criterion with every element pair (FaNE's water, Delta 3.0) dates the failure where
    the post-hoc criterion on the H-H partial does; the O-O partial alone never fails."""
    from collections import namedtuple

    import jax.numpy as jnp

    from jaxbench import metrics as M

    rng = np.random.default_rng(2)
    L, r_max, dr, window, delta = 9.0, 4.0, 0.1, 4, 3.0
    cell, pbc, species, base = _water_like_box(rng, L)
    frames = []
    for t in range(30):
        x = base + 0.05 * rng.standard_normal((24, 3))
        if t >= 12:  # H atoms 8+2k+1 jump next to 8+2k
            x[9::2] = x[8::2] + np.array([0.75, 0.0, 0.0])
        frames.append(x)
    frames = np.stack(frames)
    _, g_ref = M.rdf_frames(frames[:10], cell, pbc, species, r_max, dr, pairs="all")
    g_ref = np.asarray(g_ref).mean(0)
    _, g = M.rdf_frames(frames, cell, pbc, species, r_max, dr, pairs="all")
    expect = int(M.stability_rdf(g, g_ref, dr, window, delta))
    assert 12 - window < expect <= 12
    pairs = M.species_pairs(species)
    oo = [k for k, p in enumerate(pairs) if tuple(p) == (8, 8)][0]
    assert int(M.stability_rdf(np.asarray(g)[:, oo], g_ref[oo], dr, window, delta)) == len(frames)

    hook = M.rdf_stability_hook(g_ref, cell, pbc, species, r_max, dr, window, delta, pairs="all")
    State = namedtuple("State", "position")
    mem = hook.init(State(jnp.asarray(frames[0])))
    for t in range(1, len(frames)):
        mem, failed, onset = hook.update(mem, State(jnp.asarray(frames[t])))
        if bool(failed):
            break
    assert bool(failed) and t - int(onset) == expect


@pytest.mark.slow
def test_water_bench_end_to_end_with_the_generating_force_field(tmp_path, monkeypatch):
    import jax

    jax.config.update("jax_enable_x64", True)
    from jaxbench import data, generate
    from jaxbench.bench import bench
    from jaxbench.data import ENV_DATA_DIR

    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path))
    g = generate.generate("water-64", frames=40, seed=0, data_dir=tmp_path, equil_npt_ps=1.0, equil_nvt_ps=0.2,
                          frame_every_steps=5)
    oracle = generate.oracle_for(data.get(g["dataset"]).generated)
    proto = md.load_protocol("fane-water-short", "water-1k")
    r = bench(small_schnet(r_max=4.0), g["dataset"], tmp_path / "b", protocol=proto, train_budget="20s", max_epochs=2,
              oracle=oracle, progress=False, n_test=4)
    stab = r["stability"]
    assert "every element pair" in stab["criterion_in_md"] and "Delta 3.0" in stab["criterion_in_md"]
    assert r["structure"]["reference"].startswith("oracle 'water-64' rollout")
    dyn = r["dynamics"]
    assert set(dyn["reference_diffusivity_cm2_s"]) == {"H", "O"} and "1000 fs windows" in dyn["window"]
    d_o = dyn["reference_diffusivity_cm2_s"]["O"]["per_replica"]
    assert all(0 < d < 1e-3 for d in d_o), d_o  # liquid water ~2e-5 cm²/s; 1 ps windows are short and noisy
    assert r["violation"]["reference"].startswith("oracle")
    assert r["simulation"]["speed"]["steps_per_s"] > 0


def test_pair_rdf_mae_sees_only_the_pair_that_changed():
    """FaNE Table 8's per-pair RDF MAE: H atoms moved next to each other change H-H (and H-O), never O-O;
    the same frames as the reference score 0; a failed replica's stable frames only are used."""
    from jaxbench import metrics as M
    from jaxbench.scoring import pair_rdf_mae

    rng = np.random.default_rng(3)
    L, r_max, dr = 9.0, 4.0, 0.1
    cell, pbc, species, base = _water_like_box(rng, L)
    ref = base + 0.05 * rng.standard_normal((20, 24, 3))
    moved = ref.copy()
    moved[:, 9::2] = moved[:, 8::2] + np.array([0.75, 0.0, 0.0])
    pos = np.stack([ref, moved])
    out = pair_rdf_mae(pos, cell, ref, np.broadcast_to(cell, (20, 3, 3)), pbc, species, np.array([20, 20]), r_max, dr)
    assert set(out) == {"H-H", "H-O", "O-O"}
    assert out["O-O"]["per_replica"] == [0.0, 0.0] and out["H-H"]["per_replica"][0] == 0.0
    g_hh = lambda x: np.asarray(M.rdf(x, cell, pbc, species, r_max, dr, pairs=[(1, 1)])[1])[0]  # noqa: E731
    assert out["H-H"]["per_replica"][1] == pytest.approx(float(M.rdf_mae(g_hh(moved), g_hh(ref), dr)), rel=1e-9)
    assert out["H-H"]["per_replica"][1] > 1.0
    # replica 1 stable for 0 frames: no value
    assert pair_rdf_mae(pos, cell, ref, cell[None].repeat(20, 0), pbc, species, np.array([20, 0]), r_max,
                        dr)["H-H"]["per_replica"][1] is None


def test_fane_report_tables_put_the_paper_beside_ours(tmp_path):
    """`jaxbench report --paper fu2023` on hand-made results: units converted (fs -> ps, cm²/s -> 1e-9 m²/s
    MAE), the published SchNet rows beside ours, a table without published values says so."""
    from jaxbench.report import published, report
    from jaxbench.scoring import replica_stats

    def result(dataset, **sections):
        return {"dataset": dataset, "model": "schnet-x", "architecture": "schnet",
                "accuracy": {"forces_mae_meV_A": 12.5},
                "simulation": {"speed": {"steps_per_s": 250.0}},
                "stability": {"stable_time_fs": replica_stats([100_000.0, 300_000.0])}, **sections}

    water = result("water-1k", structure={"rdf_mae_per_pair": {"O-O": replica_stats([0.2, 0.4]),
                                                             "H-H": replica_stats([0.1, 0.1]),
                                                             "H-O": replica_stats([0.3, 0.5])}},
                   dynamics={"diffusivity_cm2_s": {"O": replica_stats([2.0e-5, 3.0e-5])},
                             "reference_diffusivity_cm2_s": {"O": replica_stats([2.3e-5, 2.3e-5])}})
    ala = result("alanine-dipeptide-n2000-s0", free_energy={"runs": 6, "finished_runs": 4, "mae_kJ_mol": {
        "F(phi)": replica_stats([1.0, 2.0, 3.0, None]), "F(psi)": replica_stats([0.5, 0.5, 0.5, None])}})
    water512 = result("water-512-n100-s0")
    for name, r in (("w", water), ("a", ala), ("w512", water512)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    rep = report([tmp_path / "w", tmp_path / "a", tmp_path / "w512"], out=tmp_path / "rep", paper="fu2023")
    t8 = rep["tables"]["table8"]["rows"][0]
    paper = next(r for r in published()["fu2023"]["table8"]["rows"] if r["model"] == "SchNet")
    assert t8[0] == "schnet-x" and t8[1] == "12.5" and t8[2].startswith(f"{paper['Force']:g}")
    assert t8[3] == "200 (100)"  # stable ps: mean (std) of 100 and 300 ps
    assert t8[5] == "0.3 (0.1)" and t8[11] == "0.2"  # |2.5e-5 - 2.3e-5| cm²/s = 0.2 x 1e-9 m²/s
    t5 = rep["tables"]["table5"]["rows"][0]
    assert t5[3] == "4/6" and t5[5].startswith("2 (") and t5[7] == "0.5 (0)"
    assert "not in the project's copy" in rep["tables"]["table11"]["title"]
    # FaNE's rows for the architectures not run sit under ours, paper cells only; SchNet's is not repeated
    labels = [row[0] for row in rep["tables"]["table8"]["rows"]]
    assert "FaNE: SchNet" not in labels and "FaNE: NequIP" in labels
    nequip = next(row for row in rep["tables"]["table8"]["rows"] if row[0] == "FaNE: NequIP")
    paper_nequip = next(r for r in published()["fu2023"]["table8"]["rows"] if r["model"] == "NequIP")
    assert nequip[1] == "" and nequip[2] == f"{paper_nequip['Force']:g}" and nequip[3] == ""
    ala_nequip = next(row for row in rep["tables"]["table5"]["rows"] if row[0] == "FaNE: NequIP")
    paper_ala = next(r for r in published()["fu2023"]["table5"]["rows"] if r["model"] == "NequIP")
    assert ala_nequip[4] == f"{paper_ala['#Finished']}/{paper_ala['#Finished_total']}"
    assert "regenerated with OpenMM" in (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(Exception, match="unknown paper"):
        report([tmp_path / "w"], paper="fu2024")


def test_generated_water_goes_to_the_table_of_its_training_size(tmp_path):
    """A bench on a generated water-64-n<N> dataset lands in FaNE's table for its training size (1000 frames:
    Table 8, water-1k), labelled with the dataset; older results find the size in the run's dataset.json."""
    from jaxbench.report import report

    run = tmp_path / "b10k" / "train"
    run.mkdir(parents=True)
    (run / "dataset.json").write_text(json.dumps({"name": "water-64-n20000-s0", "n_train": 10000}))
    rows = {"b1k": {"dataset": "water-64-n3000-s0", "model": "m", "training": {"n_train": 1000}},
            "b10k": {"dataset": "water-64-n20000-s0", "model": "m", "training": {"run_dir": str(run)}},
            "b7": {"dataset": "water-64-n3000-s0", "model": "m", "training": {"n_train": 700}}}
    for name, r in rows.items():
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    rep = report([tmp_path / n for n in rows], paper="fu2023")
    assert rep["tables"]["table8"]["rows"][0][0] == "m (water-64-n3000-s0, 1000 train)"
    assert rep["tables"]["table4"]["rows"][0][0] == "m (water-64-n20000-s0, 10000 train)"
    ours = [row[0] for t in rep["tables"].values() for row in t["rows"] if not row[0].startswith("FaNE:")]
    assert len(ours) == 2  # 700 training frames is none of FaNE's sizes


def test_rdf_window_deviation_names_the_pair_that_broke():
    """results.json's per-pair view of FaNE eq. 8: the H atoms pair up from frame 12; the window the engine
    stopped the replica at is over the threshold in H-H but not in O-O (the O atoms only jiggle), and an
    unbroken replica's last window is under the threshold everywhere; both equal the partials by hand."""
    from jaxbench import metrics as M
    from jaxbench.scoring import rdf_window_deviation

    rng = np.random.default_rng(2)
    L, window = 9.0, 4
    cell, pbc, species, base = _water_like_box(rng, L)
    good = base + 0.05 * rng.standard_normal((20, 24, 3))
    broken = good.copy()
    broken[12:, 9::2] = broken[12:, 8::2] + np.array([0.75, 0.0, 0.0])
    settings = BenchSettings(dr=0.1, rdf_r_max=4.0, rdf_stability_threshold=3.0, rdf_stability_pairs="all")
    ref = good[:10]
    out = rdf_window_deviation(np.stack([good, broken]), cell, pbc, species, ref, np.broadcast_to(cell, (10, 3, 3)),
                               np.array([20, 12]), np.array([False, True]), window, settings)
    dev = out["window_deviation_per_pair"]
    assert set(dev) == {"O-O", "H-H", "H-O"}
    assert out["pairs_over_threshold"][0] == [] and "H-H" in out["pairs_over_threshold"][1]
    assert "O-O" not in out["pairs_over_threshold"][1]
    # by hand: the H-H partial averaged over frames 12..15 against the reference's
    g_hh = lambda x: np.asarray(M.rdf_frames(x, cell, pbc, species, 4.0, 0.1, pairs=[(1, 1)])[1]).mean(0)[0]  # noqa: E731
    assert dev["H-H"][1] == pytest.approx(float(M.rdf_mae(g_hh(broken[12:16]), g_hh(ref), 0.1)), rel=1e-9)
    assert dev["H-H"][0] == pytest.approx(float(M.rdf_mae(g_hh(good[16:20]), g_hh(ref), 0.1)), rel=1e-9)


def test_visited_angles_of_failed_replicas_are_their_frames_before_failure():
    """The Ramachandran plot of a run in which nothing finished shows (phi, psi) of the failed replicas'
    frames before their failure: those frames only, dihedrals as NumPy computes them by hand."""
    from jaxbench.stages import _visited_cvs

    proto = md.load_protocol("fane-alanine-short", "alanine-dipeptide")
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(3, 5, 22, 3)) * 2.0

    def dihedral(x, i, j, k, l):  # IUPAC sign (as OpenMM / PLUMED): atan2(((b1 x b2) x (b2 x b3)).b2/|b2|, ...)
        b1, b2, b3 = x[j] - x[i], x[k] - x[j], x[l] - x[k]
        n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
        return np.arctan2(np.dot(np.cross(n1, n2), b2 / np.linalg.norm(b2)), np.dot(n1, n2))

    out = _visited_cvs({"position": pos}, proto, np.array([True, False, True]), np.array([2, 5, 0]))
    assert out.shape == (2, 2)  # replica 0: frames 0, 1; replica 1 finished; replica 2 failed at frame 0
    (a, b, c, d), (e, f, g, h) = proto.metadynamics.dihedrals
    for row, t in zip(out, (0, 1)):
        assert row[0] == pytest.approx(dihedral(pos[0, t], a, b, c, d), abs=1e-5)
        assert row[1] == pytest.approx(dihedral(pos[0, t], e, f, g, h), abs=1e-5)
    assert _visited_cvs({"position": pos}, proto, np.array([False, False, False]), np.array([5, 5, 5])) is None
