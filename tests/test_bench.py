"""The end-to-end benchmark, the quickstart notebook and the reports.

One module-scoped run of notebooks/01_quickstart.ipynb (small settings) feeds most tests; the numbers
it reports are re-derived here independently (trajectory file -> NumPy / ASE) where that is cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxbench import data, metrics, report
from jaxbench.scoring import energy_force_violations, na, violations_vs_split
from jaxbench.reference import reference_split

from .conftest import requires_data

REPO = Path(__file__).resolve().parents[1]


def run_notebook(path: Path, env: dict) -> dict:
    """Execute a notebook's code cells in order in one namespace (what a kernel would do)."""
    nb = json.loads(path.read_text())
    ns: dict = {"__name__": "__notebook__"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                src = "".join(cell["source"])
                exec(compile(src, f"{path.name}[cell {i}]", "exec"), ns)  # noqa: S102
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ns


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    from jaxbench import cards

    out = tmp_path_factory.mktemp("qs")
    ns = run_notebook(REPO / "notebooks" / "01_quickstart.ipynb",
                      {"JAXBENCH_NOTEBOOK_SMALL": "1", "JAXBENCH_NOTEBOOK_OUT": str(out)})
    yield out, ns["results"]
    cards._EXTRA_PATHS.clear()
    cards.clear_caches()


def test_quickstart_notebook_writes_every_section(quickstart_run):
    out, r = quickstart_run
    bench_dir = out / "bench"
    on_disk = json.loads((bench_dir / "results.json").read_text())
    assert on_disk["finished"] and on_disk["model"] == "mace-small-quickstart"
    for key in ("training", "accuracy", "simulation", "structure", "stability", "violation", "dynamics",
                "oracle_on_model_frames"):
        assert key in on_disk and not on_disk[key].get("not_applicable"), key
    assert r["simulation"]["replicas"] == 2 and r["simulation"]["steps"] == 100
    for name in ("rdf", "traces", "msd", "violation", "parity"):
        assert Path(r["plots"][name]).is_file(), name
    text = (bench_dir / "report.md").read_text()
    assert "Table 1" in text and "Table 3" in text
    # the generated dataset is a real dataset card with checksums
    spec = data.get("lj-argon")
    assert spec.periodic and len(spec.files) == 3


def test_bench_metrics_match_an_independent_recomputation(quickstart_run):
    """WF / JSD / EV / FV / D recomputed here from the HDF5 files with NumPy (and ASE's RDF)."""
    import h5py
    from ase.geometry.rdf import get_rdf

    out, r = quickstart_run
    ds = json.loads((Path(r["training"]["run_dir"]) / "dataset.json").read_text())
    assert r["training"]["n_train"] == ds["n_train"] > 0  # FaNE's report files water runs by training size
    traj = out / "bench" / "trajectory.h5"
    ref = out / "bench" / "reference.h5"

    from jaxbench.trajectory import read_info

    def read(path):
        n = int(read_info(path)["frames_committed"])
        with h5py.File(path, "r") as f:
            groups = sorted(f["particles"])
            pos = np.stack([f[f"particles/{g}/position/value"][:n] for g in groups])
            frc = np.stack([f[f"particles/{g}/force/value"][:n] for g in groups])
            e = np.stack([f[f"observables/{g}/potential_energy/value"][:n] for g in groups])
            cell = f[f"particles/{groups[0]}/box/edges"][:]
            numbers = f[f"particles/{groups[0]}/species"][:]
        return pos, frc, e, cell, numbers

    pos, frc, e, cell, numbers = read(traj)
    rpos, rfrc, re, _, _ = read(ref)
    # EV / FV (EGraFFBench eq. 4) by hand, geometric mean over t > 0, mean over replicas
    ev = (e - re) ** 2 / (e**2 + re**2)
    fv = np.linalg.norm((frc - rfrc).reshape(*frc.shape[:2], -1), axis=-1) / (
        np.linalg.norm(frc.reshape(*frc.shape[:2], -1), axis=-1) + np.linalg.norm(rfrc.reshape(*rfrc.shape[:2], -1), axis=-1))
    gm = lambda x: np.exp(np.mean(np.log(np.maximum(x[:, 1:], 1e-30)), axis=1))  # noqa: E731
    v = r["violation"]
    np.testing.assert_allclose(v["EV"]["per_replica"], gm(ev), rtol=1e-9)
    np.testing.assert_allclose(v["FV"]["per_replica"], gm(fv), rtol=1e-9)
    assert 0 < v["FV"]["mean"] < 1
    # Wright's factor of replica 0 vs the pooled reference rollout, g(r) from ASE (minimum image: r_max
    # within half the 11.8 Å box)
    from ase import Atoms

    st = r["structure"]
    r_max, dr = 5.5, st["dr_A"]
    nb = int(round(r_max / dr))
    stable = int(r["stability"]["stable_time_fs"]["per_replica"][0] / r["simulation"]["frame_interval_fs"])
    assert stable >= 0

    def ase_g(frames):
        return np.mean([get_rdf(Atoms(numbers, positions=p, cell=cell, pbc=True), r_max, nb)[0] for p in frames], axis=0)

    g_model = ase_g(pos[0])
    g_ref = ase_g(rpos.reshape(-1, *rpos.shape[2:]))
    _, g_model_jb = metrics.rdf(pos[0], cell, True, numbers, r_max, dr)
    _, g_ref_jb = metrics.rdf(rpos.reshape(-1, *rpos.shape[2:]), cell, True, numbers, r_max, dr)
    np.testing.assert_allclose(np.asarray(g_model_jb), g_model, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_ref_jb), g_ref, atol=1e-6)
    wf = 100 * np.sqrt(np.sum((g_model - g_ref) ** 2) / np.sum(g_ref**2))
    assert abs(float(metrics.wright_factor(g_model_jb, g_ref_jb)) - wf) < 1e-6
    # the bench's own number uses r_max 6 Å with all images: same order as this minimum-image check
    assert st["wright_factor_pct"]["per_replica"][0] is None or st["wright_factor_pct"]["per_replica"][0] > 0


def test_model_against_itself_scores_zero(quickstart_run, monkeypatch):
    """With the trained model as its own oracle and one replica, the reference rollout is the model's
    rollout: EV = FV = 0 and the structure matches exactly."""
    from jaxbench import runs
    from jaxbench.bench import bench
    from jaxbench.md import as_energy_model
    from jaxbench.quickstart import DATASET, protocol

    out, r = quickstart_run
    pot, params = runs.load_potential(r["run_dir"])
    res = bench(None, DATASET, out / "self", run=r["run_dir"], protocol=protocol(), replicas=1, steps=100,
                oracle=as_energy_model(pot, params), progress=False, plots=False)
    assert res["training"]["reused"]
    # a reused run reports its own training summary, as the run that trained it did
    assert res["training"]["stop_reason"] == r["training"]["stop_reason"] and res["training"]["step"] == r["training"]["step"]
    assert res["violation"]["EV"]["per_replica"][0] < 1e-20
    assert res["violation"]["FV"]["per_replica"][0] < 1e-10
    assert res["structure"]["wright_factor_pct"]["per_replica"][0] < 1e-8
    d, dref = res["dynamics"]["diffusivity_cm2_s"]["Ar"], res["dynamics"]["reference_diffusivity_cm2_s"]["Ar"]
    if d["mean"] is not None:
        np.testing.assert_allclose(d["mean"], dref["mean"], rtol=1e-8)
    # run again into the same directory: the evaluation and both finished rollouts are reused, not recomputed
    from jaxbench import stages

    monkeypatch.setattr(stages, "evaluate_stage", lambda *a, **k: pytest.fail("evaluated again"))
    monkeypatch.setattr(stages, "score_structure", lambda *a, **k: pytest.fail("scored again"))
    again = bench(None, DATASET, out / "self", run=r["run_dir"], protocol=protocol(), replicas=1, steps=100,
                  oracle=as_energy_model(pot, params), progress=False, plots=False)
    t = again["simulation"]["timings_s"]
    assert t["resumed_at_step"] == 100 and t["first_chunk_s"] == 0.0
    assert again["accuracy"] == res["accuracy"] and again["accuracy_key"]["checkpoint_sha256"]
    assert again["violation"] == res["violation"] and again["structure"] == res["structure"]
    assert again["scores_reused"] and not res["scores_reused"] and again["dynamics"] == res["dynamics"]
    # a changed trajectory is scored again
    monkeypatch.undo()
    import h5py

    with h5py.File(out / "self" / "trajectory.h5", "a") as f:
        f["particles/replica_000/velocity/value"][-1, 0, 0] += 1e-3
    third = bench(None, DATASET, out / "self", run=r["run_dir"], protocol=protocol(), replicas=1, steps=100,
                  oracle=as_energy_model(pot, params), progress=False, plots=False)
    assert not third["scores_reused"]


@pytest.mark.slow  # the engine's RDF criterion itself: tests/test_md.py (default suite)
def test_rdf_stability_runs_inside_the_md_engine(quickstart_run):
    """bench hands FaNE's RDF criterion to the MD engine: with Delta = 0 every replica fails at its
    first full window, is dated at the window's start (frame 0), is frozen from the judged frame on,
    and its EV / FV still cover the frames it really simulated."""
    from jaxbench import runs
    from jaxbench.bench import BenchSettings, bench
    from jaxbench.quickstart import DATASET, oracle, protocol
    from jaxbench.trajectory import read

    out, r = quickstart_run
    p = protocol()
    window = 4
    settings = BenchSettings(rdf_stability_window_fs=window * p.save_every * p.timestep_fs, rdf_stability_threshold=0.0)
    res = bench(None, DATASET, out / "rdf-hook", run=r["run_dir"], protocol=p, replicas=2, steps=100, oracle=oracle(),
                settings=settings, progress=False, plots=False)
    st = res["stability"]
    assert "RDF" in st["criterion_in_md"] and "inside the MD engine" in st["rdf"]["criterion"]
    assert st["rdf"]["failed"] == [True, True] and st["rdf"]["first_unstable_frame"] == [0, 0]
    assert all("hook" in x for x in res["simulation"]["failure_reason"])
    assert st["stable_time_fs"]["per_replica"] == [0.0, 0.0]
    traj = read(out / "rdf-hook" / "trajectory.h5")
    pos = np.asarray(traj["position"])
    assert np.all(pos[:, window - 1:] == pos[:, window - 1: window])  # frozen at the judged frame
    assert not np.all(pos[:, 1] == pos[:, 0])
    assert res["violation"]["EV"]["per_replica"][0] is not None  # EV / FV over the frames before detection
    runs.read_run(r["run_dir"])


def test_report_tables_put_paper_values_beside_ours(quickstart_run, tmp_path):
    out, r = quickstart_run
    fake = dict(r, dataset="md17-ethanol", architecture="nequip", model="nequip")
    path = tmp_path / "b"
    path.mkdir()
    (path / "results.json").write_text(json.dumps(fake))
    res = report.report([path], out=tmp_path / "rep")
    t1 = res["tables"]["table1"]["rows"][0]
    assert t1[3] == "2.67" and t1[5] == "7.49"  # EGraFFBench Table 1, ethanol, NequIP
    t3 = res["tables"]["table3"]["rows"][0]
    assert "(" in t3[3]  # the paper's EV with its std
    assert (tmp_path / "rep" / "table1.csv").read_text().startswith("dataset,model,E ours")


def test_published_values_copy():
    rows = report.published()["egraffbench"]["table1"]["rows"]
    mace = [x for x in rows if x["dataset"] == "Ethanol" and x["model"] == "MACE"][0]
    assert (mace["E"], mace["F"]) == (2.36, 3.19)  # the numbers issue 4 quotes
    assert report.paper_row("table2", "lips", "mace") is not None
    assert report.paper_row("table1", "lips20-P2S5", "nequip")["dataset"] == "LiPS20"
    assert report.paper_row("table1", "lj-argon", "mace") is None


def test_violations_against_a_time_ordered_split():
    """EV / FV against ground-truth frames: replica r starting at frame s compares frame s + k*ratio."""
    from types import SimpleNamespace

    from jaxbench.frames import Frames

    rng = np.random.default_rng(0)
    n_ref, N = 30, 3
    pos = rng.normal(size=(n_ref, N, 3)) * 2
    e = rng.normal(size=n_ref) - 10
    f = rng.normal(size=(n_ref, N, 3))
    ref = Frames.from_arrays(pos, [1, 1, 8], energy=e, forces=f, validate=False)
    ordered = {"split": "test", "frame_interval_fs": 0.5}
    start = SimpleNamespace(n_atoms=N, frame_indices=(0, 20))
    proto = SimpleNamespace(timestep_fs=0.5, save_every=2)  # one saved frame per 2 reference frames
    T = 8
    e_model = rng.normal(size=(2, T)) - 10
    f_model = rng.normal(size=(2, T, N, 3))

    import jaxbench.data as D

    orig = D.load
    D.load = lambda *a, **k: ref
    try:
        out = violations_vs_split("x", ordered, start, proto, e_model, f_model, np.array([T, T]), None)
    finally:
        D.load = orig
    assert out["frames_compared"] == [8, 5]  # frames 20, 22, ..., 28 exist for replica 1
    idx0 = np.arange(T) * 2
    ev0 = (e_model[0] - e[idx0]) ** 2 / (e_model[0] ** 2 + e[idx0] ** 2)
    np.testing.assert_allclose(out["curves"]["EV"][0], ev0)
    np.testing.assert_allclose(out["EV"]["per_replica"][0], np.exp(np.mean(np.log(ev0[1:]))))
    proto_bad = SimpleNamespace(timestep_fs=0.3, save_every=1)
    assert violations_vs_split("x", ordered, start, proto_bad, e_model, f_model, np.array([T, T]), None)["not_applicable"]


def test_violation_of_failed_replica_is_not_a_number():
    out = energy_force_violations(np.ones((2, 4)), np.ones((2, 4, 2, 3)), np.ones((2, 4)) * 1.1, np.ones((2, 4, 2, 3)),
                      np.array([4, 0]), "x")
    assert out["EV"]["per_replica"][1] is None and out["EV"]["per_replica"][0] > 0
    assert out["EV"]["mean"] == out["EV"]["per_replica"][0]
    assert na("why")["value"] is None


@requires_data
@pytest.mark.parametrize("name", ["md17-aspirin", "md17-ethanol", "md17-naphthalene", "md17-salicylic_acid"])
def test_time_ordered_splits_are_trajectories(name):
    """The card's claim behind EV / FV: consecutive frames of the split are 0.5 fs apart (they move far
    less than random pairs do; 0.5 fs at 500 K moves atoms ~0.01-0.02 Å rms)."""
    spec = data.get(name)
    fr = data.load(name, spec.trajectory["split"])
    n = int(fr.n_atoms[0])
    pos = np.asarray(fr.positions).reshape(len(fr), n, 3)
    step = np.sqrt(((pos[1:] - pos[:-1]) ** 2).sum(-1).mean(-1))
    rand = np.sqrt(((pos[np.random.default_rng(0).permutation(len(fr))] - pos) ** 2).sum(-1).mean(-1))
    assert np.median(step) < 0.03 and np.quantile(step, 0.99) < 0.1
    assert np.median(rand) > 10 * np.median(step)


@requires_data
def test_bench_refuses_bad_input_before_compute(tmp_path):
    from jaxbench.bench import bench
    from jaxbench.errors import JaxbenchError, UnknownNameError

    with pytest.raises(UnknownNameError):
        bench("mace-small", "md17-ethanl", tmp_path / "a")
    with pytest.raises(JaxbenchError, match="temperature"):
        bench("mace-small", "md17-ethanol", tmp_path / "b", temperature=-5)
    with pytest.raises(JaxbenchError):
        bench(None, "md17-ethanol", tmp_path / "c", run=tmp_path / "no-such-run")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@requires_data
def test_named_tasks_and_their_reference_frames():
    from jaxbench import tasks
    from jaxbench.errors import UnknownNameError

    t = tasks.tasks()
    assert {"3bpa-600k", "acac-600k", "lips20-ood", "md17-transfer-aspirin-to-ethanol"} <= set(t)
    groups = [g for *_, g in t["lips20-ood"].runs]
    assert groups.count("train") == 5 and groups.count("crystal") == 4 and groups.count("test") == 7
    # structure references at the protocol's temperature, never frames from another one
    assert reference_split("3bpa", "egraffbench") == "test_300K"
    assert reference_split("3bpa", "egraffbench-600k") == "test_600K"
    assert reference_split("acac", "egraffbench-600k") is None
    assert reference_split("acac", "egraffbench") == "test"
    with pytest.raises(UnknownNameError, match="3bpa-600k"):
        tasks.get("3bpa-600")


@requires_data
@pytest.mark.slow
def test_md17_transfer_task_end_to_end(tmp_path):
    from jaxbench.tasks import run_task

    s = run_task("md17-transfer-ethanol-to-aspirin", "mace-small", tmp_path, train_budget="60s", max_epochs=1,
                 n_train=10, n_val=5, n_test=10, replicas=2, steps=100, progress=False)
    r = json.loads((tmp_path / "aspirin" / "results.json").read_text())
    assert r["dataset"] == "md17-aspirin" and r["training"]["reused"]
    assert s["groups"]["transfer"]["forces_mae_meV_A"]["n"] == 1
