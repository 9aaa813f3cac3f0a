"""Generated datasets (jaxbench.generate): OpenMM water / alanine dipeptide and ASE EMT generators."""

from __future__ import annotations

import numpy as np
import pytest

from jaxbench import cards, data, generate
from jaxbench.errors import DataError

openmm = pytest.importorskip("openmm")

KJ = 0.0103642688  # eV per kJ/mol
TINY_WATER = dict(equil_npt_ps=1.0, equil_nvt_ps=0.2, frame_every_steps=5)
TINY_ALA = dict(equil_ps=0.5, frame_every_ps=0.05)


@pytest.fixture(scope="module")
def water_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    out = generate.generate("water-64", frames=4, seed=3, data_dir=d, **TINY_WATER)
    return d, out


def _card(d, out):
    return cards.read_card(out["card"])


def test_water_card_verifies_and_loads(water_dir):
    d, out = water_dir
    assert out["dataset"] == "water-64-n4-s3"
    st = [s for s in data.verify([out["dataset"]], data_dir=d)]
    assert [s.state for s in st] == ["ok"]
    card = _card(d, out)
    g = card["generated"]
    assert g["generator"] == "water-64" and g["seed"] == 3 and g["frames"] == 4
    assert g["parameters"]["equil_npt_ps"] == 1.0 and "spcfw" in g["parameters"]
    assert card["sources"]["all"]["files"][0]["sha256"] == out["sha256"]
    fr = data.load(out["dataset"], "train", data_dir=d)
    allf = data.load(out["dataset"], "all", data_dir=d) if "all" in data.get(out["dataset"], d).splits else None
    assert fr.info["generated"]["generator"] == "water-64"
    assert len(fr) == 2 and fr.positions.shape[-1] == 3
    assert allf is None or len(allf) == 4
    rows = {r["name"]: r for r in data.dataset_table(d)}
    assert rows[out["dataset"]]["verified"]


def test_water_corrupt_file_is_named(water_dir, tmp_path):
    d, out = water_dir
    import shutil

    d2 = tmp_path / "copy"
    shutil.copytree(d, d2)
    p = d2 / "Generated" / out["dataset"] / "frames.npz"
    b = bytearray(p.read_bytes())
    b[-100] ^= 1
    p.write_bytes(bytes(b))
    with pytest.raises(DataError, match="frames.npz"):
        data.load(out["dataset"], "train", data_dir=d2)


def test_water_same_seed_identical(water_dir, tmp_path):
    d, out = water_dir
    again = generate.generate("water-64", frames=4, seed=3, data_dir=tmp_path, **TINY_WATER)
    assert again["sha256"] == out["sha256"]
    other = generate.generate("water-64", frames=4, seed=4, data_dir=tmp_path, **TINY_WATER)
    assert other["sha256"] != out["sha256"]


def test_water_units_against_openmm(water_dir):
    """Stored eV / eV/Å / Å equal OpenMM's own kJ/mol, kJ/mol/nm, nm on the same frame."""
    from openmm import Context, Platform, Vec3, VerletIntegrator, unit

    from jaxbench.generate.openmm_systems import water_system

    d, out = water_dir
    fr = data.load(out["dataset"], "test", data_dir=d)
    p = _card(d, out)["generated"]["parameters"]
    L_nm = p["equilibrated_box_A"] / 10
    assert np.allclose(fr.cell[0], np.eye(3) * p["equilibrated_box_A"])
    system = water_system(64, L_nm, p["cutoff_A"] / 10, electrostatics=p["electrostatics"])
    ctx = Context(system, VerletIntegrator(0.001), Platform.getPlatformByName("CPU"))
    ctx.setPositions(fr.positions[:192] / 10.0)  # Å -> nm
    st = ctx.getState(getEnergy=True, getForces=True)
    e_kj = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f_kj_nm = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    assert len(fr) == 1
    assert fr.energy[0] == pytest.approx(e_kj * KJ, rel=1e-6)
    # OpenMM's CPU platform sums PME forces in single precision in a thread-count-dependent order, so two
    # contexts agree to ~1e-5 eV/Å (seen: 7.5e-6); a unit slip (nm vs Å, kJ vs kcal) is a factor >= 4
    np.testing.assert_allclose(fr.forces[:192], f_kj_nm * KJ / 10.0, rtol=1e-5, atol=3e-5)
    # the oracle reproduces the stored labels
    orc = generate.oracle_for(fr.info["generated"])
    e, f = orc.evaluate_frames(fr.positions[:192][None], fr.cell[0])
    assert e[0] == pytest.approx(fr.energy[0], rel=1e-6)
    np.testing.assert_allclose(f[0], fr.forces[:192], rtol=1e-5, atol=3e-5)


def test_water_forces_are_energy_gradient(water_dir):
    """Central finite differences of the oracle energy equal its forces (a few components)."""
    d, out = water_dir
    fr = data.load(out["dataset"], "train", data_dir=d)
    p = _card(d, out)["generated"]["parameters"]
    orc = generate.openmm_oracle("water-64", cutoff_A=p["cutoff_A"], platform="Reference")
    x = fr.positions[:192].copy()
    cell = fr.cell[0]
    _, f0 = orc.evaluate_frames(x[None], cell)
    h = 1e-4  # Å (small: a pair crossing the truncated real-space cutoff within ±h would break the difference)
    for atom, k in [(0, 0), (1, 2), (5, 1), (100, 0)]:
        xp, xm = x.copy(), x.copy()
        xp[atom, k] += h
        xm[atom, k] -= h
        ep, _ = orc.evaluate_frames(xp[None], cell)
        em, _ = orc.evaluate_frames(xm[None], cell)
        fd = -(ep[0] - em[0]) / (2 * h)
        assert fd == pytest.approx(f0[0, atom, k], abs=1e-3 + 1e-3 * abs(fd)), (atom, k)


def test_alanine_walkers_do_not_depend_on_processes(tmp_path):
    """Independent chains concatenated in walker order: the same data whether the chains ran in one process
    or in parallel ones, different chains from different seeds, the walker of each frame in the card."""
    one = generate.generate("alanine-dipeptide", frames=4, seed=1, data_dir=tmp_path / "a", walkers=2, processes=1, **TINY_ALA)
    two = generate.generate("alanine-dipeptide", frames=4, seed=1, data_dir=tmp_path / "b", walkers=2, processes=2, **TINY_ALA)
    assert one["sha256"] == two["sha256"]
    card = cards.read_card(one["card"])
    assert card["groups"] == {"walker-0": [0, 1], "walker-1": [2, 3]}
    assert card["generated"]["parameters"]["frames_per_walker"] == [2, 2]
    first = data.load(one["dataset"], "train", data_dir=tmp_path / "a")  # frames 0:2, walker 0
    last = data.load(one["dataset"], "test", data_dir=tmp_path / "a")  # frame 3, walker 1
    assert np.asarray(last.energy)[0] not in set(np.asarray(first.energy).tolist())  # not a copy of walker 0
    with pytest.raises(DataError, match="walkers"):
        generate.generate("alanine-dipeptide", frames=2, seed=0, data_dir=tmp_path / "c", walkers=3, **TINY_ALA)


def test_test_split_spanning_two_runs_is_not_a_trajectory(tmp_path, monkeypatch):
    from jaxbench.generate import base

    def fake(frames, seed, log=None, split_at=None):
        rng = np.random.default_rng(seed)
        return base.Generated(
            positions=[rng.normal(size=(2, 3)) * 3 for _ in range(frames)], numbers=[np.array([1, 1])] * frames,
            cells=[np.zeros((3, 3))] * frames, pbc=[np.zeros(3, bool)] * frames, energy=rng.normal(size=frames),
            forces=[rng.normal(size=(2, 3)) for _ in range(frames)], stress=None, force_field="none", engine="test",
            params={}, simulation={}, kind="molecule", notes="", frame_interval_fs=10.0,
            groups=[f"run-{int(i >= split_at)}" for i in range(frames)])

    monkeypatch.setitem(base.GENERATORS, "fake-runs", base.Generator("fake-runs", fake, 20, "fake"))
    inside = generate.generate("fake-runs", frames=20, seed=0, data_dir=tmp_path, split_at=10)  # test 18:20 in run-1
    across = generate.generate("fake-runs", frames=20, seed=1, data_dir=tmp_path, split_at=19)  # test 18:20 spans both
    assert cards.read_card(inside["card"])["trajectory"] == {"split": "test", "frame_interval_fs": 10.0}
    assert "trajectory" not in cards.read_card(across["card"])


def test_alanine_generate_and_finite_differences(tmp_path):
    out = generate.generate("alanine-dipeptide", frames=3, seed=0, data_dir=tmp_path, walkers=1, **TINY_ALA)
    fr = data.load(out["dataset"], "test", data_dir=tmp_path)
    assert len(fr) == 1 and fr.positions.shape == (22, 3) and not np.asarray(fr.pbc).any()
    orc = generate.openmm_oracle("alanine-dipeptide")
    e, f = orc.evaluate_frames(fr.positions[None])
    assert e[0] == pytest.approx(fr.energy[0], rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(f[0], fr.forces, rtol=1e-5, atol=1e-5)
    orc = generate.openmm_oracle("alanine-dipeptide", platform="Reference")
    e, f = orc.evaluate_frames(fr.positions[None])
    x, h = fr.positions.copy(), 1e-4
    for atom, k in [(0, 0), (8, 1), (16, 2)]:
        xp, xm = x.copy(), x.copy()
        xp[atom, k] += h
        xm[atom, k] -= h
        fd = -(orc.evaluate_frames(xp[None])[0][0] - orc.evaluate_frames(xm[None])[0][0]) / (2 * h)
        assert fd == pytest.approx(f[0, atom, k], abs=1e-3 + 1e-3 * abs(fd))
    # as an ASE calculator (what jaxbench.oracle accepts)
    atoms = fr.to_ase(0)
    assert orc.get_potential_energy(atoms) == pytest.approx(e[0])
    assert e[0] == pytest.approx(fr.energy[0], rel=1e-5, abs=1e-5)  # Reference (double) vs CPU labels


@pytest.mark.parametrize("name", ["hea-emt", "surface-emt", "bulk-emt-2"])
def test_emt_labels_equal_ase_emt(name, tmp_path):
    from ase.calculators.emt import EMT

    out = generate.generate(name, frames=6, seed=1, data_dir=tmp_path)
    assert [s.state for s in data.verify([out["dataset"]], data_dir=tmp_path)] == ["ok"]
    fr = data.load(out["dataset"], "train", data_dir=tmp_path)
    for i in (0, len(fr) - 1):
        atoms = fr.to_ase(i)
        ref = atoms.copy()
        ref.calc = EMT()
        assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), atol=1e-10)
        if ref.pbc.all():
            np.testing.assert_allclose(atoms.get_stress(), ref.get_stress(), atol=1e-10)
    again = generate.generate(name, frames=6, seed=1, data_dir=tmp_path / "again")
    assert again["sha256"] == out["sha256"]


def test_bulk_emt_two_sizes(tmp_path):
    a = generate.generate("bulk-emt-4", frames=2, seed=0, data_dir=tmp_path)
    fr = data.load(a["dataset"], "test", data_dir=tmp_path)
    assert len(fr) == 2 and fr.positions.shape == (2 * 256, 3)


def test_packaged_card_over_generated_frames(water_dir, tmp_path, monkeypatch):
    """A card with `generated_from` resolves its files from the generated card in the data directory."""
    d, out = water_dir
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "water-tiny.yaml").write_text(
        "name: water-tiny\nkind: periodic\ngenerated_from: {generator: water-64, frames: 4, seed: 3}\n"
        "sources:\n  all: {frames: 4, atoms: 192, elements: [H, O]}\n"
        "splits:\n  train: [{source: all, frames: '0:2'}]\n  test: [{source: all, frames: '2:4'}]\n"
    )
    monkeypatch.setenv(cards.ENV_CARDS, str(tmp_path))
    data.clear_caches()
    try:
        assert len(data.load("water-tiny", "test", data_dir=d)) == 2
        with pytest.raises(DataError, match="jaxbench data generate water-64 --frames 4 --seed 3"):
            data.load("water-tiny", "test", data_dir=tmp_path / "empty")
        assert [s.state for s in data.check_files("water-tiny", tmp_path / "empty")] == ["missing"]
        # a card that pins a generator parameter refuses frames made with another value, naming both
        (tmp_path / "data" / "water-tiny.yaml").write_text(
            (tmp_path / "data" / "water-tiny.yaml").read_text().replace(
                "seed: 3}", "seed: 3, parameters: {frame_every_steps: 10}}"))
        data.clear_caches()
        with pytest.raises(DataError, match=r"frame_every_steps=5.*frame_every_steps=10.*--param frame_every_steps=10"):
            data.load("water-tiny", "test", data_dir=d)
    finally:
        monkeypatch.delenv(cards.ENV_CARDS)
        data.clear_caches()


def test_packaged_generated_cards_parse():
    for name in ("water-1k", "water-10k", "water-90k", "water-512", "alanine-dipeptide"):
        spec = data.get(name)
        assert spec.generated["generator"] in generate.generators()
    assert data.get("water-90k").split_frames("test") == 10000
    assert data.get("water-1k").split_frames("train") == 1000


def test_cli(tmp_path, capsys):
    assert generate.cli_main(["bulk-emt-2", "--frames", "3", "--seed", "2", "--data-dir", str(tmp_path)]) == 0
    assert "bulk-emt-2-n3-s2" in capsys.readouterr().out
    with pytest.raises(KeyError):
        generate.cli_main(["no-such", "--data-dir", str(tmp_path)])


def test_train_and_evaluate_find_generated_data_through_data_dir(tmp_path):
    """A generated dataset outside $JAXBENCH_DATA_DIR is found by train / evaluate / simulate when given
    `data_dir` (`--data-dir`), and named as unknown without it."""
    from jaxbench.cli import build_parser
    from jaxbench.errors import UnknownNameError
    from jaxbench.train import plan_run

    name = generate.generate("bulk-emt-2", frames=3, seed=5, data_dir=tmp_path)["dataset"]
    kw = dict(n_train=None, n_val=None, train_split="train", val_split="val", training=None, statistics=None,
              checkpoint_every=None, swa_on_budget=True, devices=None)
    plan = plan_run("schnet-small", name, "1m", 1, 0, tmp_path / "run", False, "float32", data_dir=tmp_path, **kw)
    assert plan.dataset == name
    with pytest.raises(UnknownNameError):
        plan_run("schnet-small", name, "1m", 1, 0, tmp_path / "run", False, "float32", **kw)
    parser = build_parser()
    for cmd in (["train", "--model", "schnet-small", "--dataset", name], ["evaluate", "RUN"],
                ["simulate", "RUN", "--dataset", name]):
        assert parser.parse_args(cmd + ["--data-dir", str(tmp_path)]).data_dir == str(tmp_path)
