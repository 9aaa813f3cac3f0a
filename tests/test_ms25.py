"""The MS25 task (jaxbench.ms25): its pieces, its tables, and (slow) the whole pipeline on tiny settings."""

from __future__ import annotations

import numpy as np
import pytest

from jaxbench import ms25


def test_random_alloys_are_equimolar_fcc_at_the_vegard_lattice():
    from ase.data import atomic_numbers, reference_states

    a = ms25.random_alloys(6, seed=3)
    b = ms25.random_alloys(6, seed=3)
    assert list(a) == list(b) and len(a) == 6
    for name, (atoms, a0) in a.items():
        els = sorted(set(atoms.get_chemical_symbols()))
        assert 2 <= len(els) <= 5 and name.endswith("".join(sorted(els, key=name.index)))
        counts = [atoms.get_chemical_symbols().count(e) for e in els]
        assert max(counts) - min(counts) <= 1 and len(atoms) == 32
        assert a0 == pytest.approx(np.mean([reference_states[atomic_numbers[e]]["a"] for e in els]))
        np.testing.assert_allclose(atoms.cell, np.eye(3) * 2 * a0)
        np.testing.assert_array_equal(atoms.positions, b[name][0].positions)


def test_lattice_constants_per_structure_through_the_eos():
    """`lattice_constant` as a mapping: each supercell's conventional a0 from its own input constant;
    EMT against itself has zero error, and a0 agrees with ASE's EOS fit done by hand."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.eos import EquationOfState

    from jaxbench.materials import lattice_constant_errors

    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    ni = bulk("Ni", "fcc", a=3.52, cubic=True).repeat(2)
    res = lattice_constant_errors({"cu": cu, "ni": ni}, EMT(), EMT(), lattice_constant={"cu": 3.6, "ni": 3.52})
    assert res["n_failed"] == 0 and res["summary"]["a0_error_A"]["mae"] == 0.0
    for name, atoms, a in (("cu", cu, 3.6), ("ni", ni, 3.52)):
        vols, ens = [], []
        for x in np.linspace(-0.1, 0.1, 11):
            at = atoms.copy()
            at.set_cell(atoms.cell * (1 + x) ** (1 / 3), scale_atoms=True)
            at.calc = EMT()
            vols.append(at.get_volume())
            ens.append(at.get_potential_energy())
        v0, _, _ = EquationOfState(vols, ens, eos="murnaghan").fit()
        assert res["structures"][name]["oracle"]["a0_A"] == pytest.approx(a * (v0 / atoms.get_volume()) ** (1 / 3), rel=1e-9)


def synthetic(model="m", slope=-0.5):
    sizes = [50, 100, 200, 400]
    fit = {"slope": slope, "slope_stderr": 0.01}
    return {"model": model, "parts": {
        "rate": {"key": {}, "result": {"dataset": "d", "sizes": sizes, "fits": {"forces_mae_meV_A": fit}}},
        "extensivity": {"key": {}, "result": {"matrix": {"small->big": {"energy_mae_meV_atom": 1.5, "forces_mae_meV_A": 20.0,
                                                                        "stress_mae_meV_A3": None}}}},
    }}


def test_tables_print_ms25s_sign_and_the_papers_rows():
    tabs = ms25.ms25_tables([synthetic(slope=-0.5)])
    rows = tabs["ms25_table8"]["rows"]
    assert rows[0][:3] == ["m", "d", "50,100,200,400"] and rows[0][3] == "-" and rows[0][4] == "0.500 ± 0.010"
    paper = [r for r in rows if r[0].startswith("MS25: ")]
    assert {r[0] for r in paper} == {"MS25: MACE", "MS25: NequIP", "MS25: Allegro", "MS25: MTP", "MS25: ANI"}
    assert ["MS25: MACE", "HEA (MS25's data)", "50-1000", "0.050", "0.519", "0.322"] in rows
    assert tabs["ms25_extensivity"]["rows"] == [["m", "small->big", "1.50", "20.0", "-"]]


def test_sections_keep_a_finished_part_only_while_its_key_is_the_same(tmp_path):
    s = ms25._Sections(tmp_path / "ms25.json")
    s.put("rate", {"budget": "3m"}, {"x": 1}, 1.0)
    again = ms25._Sections(tmp_path / "ms25.json")
    assert again.done("rate", {"budget": "3m"})["result"] == {"x": 1}
    assert again.done("rate", {"budget": "5m"}) is None and again.done("hea", {}) is None
    (tmp_path / "ms25.json").write_text("{broken")
    assert ms25._Sections(tmp_path / "ms25.json").done("rate", {"budget": "3m"}) is None
    with pytest.raises(Exception, match="unknown part"):
        ms25.run_ms25("mace-small", tmp_path / "x", parts=["eos"])


@pytest.mark.slow
def test_ms25_pipeline_on_tiny_settings_and_its_rerun(tmp_path, monkeypatch):
    """Every part with a 2-layer NequIP for one epoch on tiny generated sets (about 4 minutes): every
    section is there with its numbers, EMT's NEB barrier equals the generator's, a re-run recomputes
    nothing, and `jaxbench report --paper ms25` renders it."""
    from jaxbench import stages
    from jaxbench.cli import main
    from jaxbench.potential import model_card

    card = model_card("nequip-small")
    card.pop("_path", None)
    card.update(name="nequip-tiny")
    card["hyperparameters"].update(num_layers=2, l_max=1)
    card["training"].update(batch_size=4, valid_batch_size=4)
    frames = {"hea-emt": 30, "surface-emt": 20, "bulk-emt-2": 20, "bulk-emt-4": 20}
    kw = dict(budget=None, max_epochs=1, compositions=2, rate_dataset="hea-emt-n30-s0", rate_sizes=(8, 16, 24),
              rate_n_test=3, volume_structures=1, volume_steps=150, frames=frames, data_dir=tmp_path / "data", progress=False)
    r = ms25.run_ms25(card, tmp_path / "out", **kw)
    p = {k: v["result"] for k, v in r["parts"].items()}
    assert set(p) == set(ms25.PARTS)
    assert p["hea"]["eos"]["n_structures"] == 2 and p["hea"]["speed"]["katoms_per_s"] > 0
    assert p["hea"]["accuracy"]["forces_mae_meV_A"] > 0
    assert p["volume"]["n_structures"] == 1 and p["volume"]["structures"]["00-" + next(iter(
        ms25.random_alloys(1)))[3:]]["oracle"]["volume_A3"] > 0
    neb = p["surface"]["neb"]["oracle"]
    assert neb["converged"] and neb["barrier_forward_eV"] == pytest.approx(0.421, abs=0.01)  # Cu/Cu(100) hop, EMT
    assert set(p["extensivity"]["matrix"]) == {"small->small", "small->big", "big->small", "big->big"}
    assert set(p["rate"]["fits"]) == {"energy_mae_meV_atom", "forces_mae_meV_A", "stress_mae_meV_A3"}
    # a re-run with the same settings trains and scores nothing again
    monkeypatch.setattr(stages, "evaluate_stage", lambda *a, **k: pytest.fail("evaluated again"))
    again = ms25.run_ms25(card, tmp_path / "out", **kw)
    assert again["parts"] == r["parts"]
    monkeypatch.undo()
    assert main(["report", str(tmp_path / "out"), "--paper", "ms25", "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Size extensivity" in text and "MS25: MACE" in text and "nequip-tiny" in text


def test_extensivity_ratios_by_hand():
    from jaxbench.materials import extensivity_ratios

    m = {"small->small": {"f": 2.0, "s": None}, "small->big": {"f": 3.0, "s": 1.0},
         "big->small": {"f": 5.0, "s": 1.0}, "big->big": {"f": 4.0, "s": 0.0}}
    assert extensivity_ratios(m, ("f", "s")) == {"small->big / big->big": {"f": 0.75, "s": None},
                                                 "big->small / small->small": {"f": 2.5, "s": None}}
