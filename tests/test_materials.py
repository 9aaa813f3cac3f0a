"""MS25 observables (jaxbench.materials), each against an independent computation."""

from __future__ import annotations

import time

import numpy as np
import pytest
from ase.build import add_adsorbate, bulk, fcc100
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.eos import EquationOfState, birchmurnaghan, murnaghan
from ase.mep import NEB, NEBTools
from ase.optimize import BFGS, QuasiNewton
from ase.units import GPa

from jaxbench import materials


class VolumeOnly(Calculator):
    """E(V) = analytic EOS of the cell volume; zero forces (fractional positions do not matter)."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, form, e0, b0, bp, v0, **kw):
        super().__init__(**kw)
        self.form, self.p = form, (e0, b0, bp, v0)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        e = float(self.form(self.atoms.get_volume(), *self.p))
        self.results.update(energy=e, free_energy=e, forces=np.zeros((len(self.atoms), 3)))


@pytest.mark.parametrize("form,name", [(murnaghan, "murnaghan"), (birchmurnaghan, "birchmurnaghan")])
def test_eos_recovers_analytic_bulk_modulus(form, name):
    b0_gpa, bp, v0 = 140.0, 4.5, 47.0  # a Cu-like cubic cell of 4 atoms
    calc = VolumeOnly(form, -3.0, b0_gpa * GPa, bp, v0)  # GPa -> eV/Å^3
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True)  # V_in = 50.65 Å^3, minimum inside the +-10 % scan
    r = materials.equation_of_state(atoms, calc, eos=name)
    assert r["ok"], r["problem"]
    assert r["B_GPa"] == pytest.approx(b0_gpa, rel=0.01)
    assert r["v0_A3"] == pytest.approx(v0, rel=1e-4)
    assert r["e0_eV"] == pytest.approx(-3.0, abs=1e-5)
    assert r["a0_A"] == pytest.approx(v0 ** (1 / 3), rel=1e-4)  # cubic cell: a0^3 = v0
    assert len(r["energies_eV"]) == 11
    assert r["volumes_A3"][0] == pytest.approx(0.9 * atoms.get_volume())
    assert r["volumes_A3"][-1] == pytest.approx(1.1 * atoms.get_volume())
    assert np.allclose(atoms.cell, np.eye(3) * 3.70)  # input untouched


def test_eos_flags_minimum_outside_scan():
    calc = VolumeOnly(murnaghan, 0.0, 100.0 * GPa, 4.0, 80.0)
    r = materials.equation_of_state(bulk("Cu", "fcc", a=3.6, cubic=True), calc)
    assert not r["ok"] and "outside" in r["problem"]


def test_eos_emt_cu_matches_ase_by_hand():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    r = materials.equation_of_state(atoms, EMT(), strain=0.10, n_points=11, eos="murnaghan")
    # by hand, the ase.eos way: scale the cell, collect (V, E), fit
    cell = atoms.get_cell()
    vols, ens = [], []
    for x in np.linspace(0.9, 1.1, 11):
        a = atoms.copy()
        a.set_cell(cell * x ** (1 / 3), scale_atoms=True)
        a.calc = EMT()
        vols.append(a.get_volume())
        ens.append(a.get_potential_energy())
    v0, e0, b = EquationOfState(vols, ens, eos="murnaghan").fit()
    assert r["ok"]
    np.testing.assert_allclose(r["energies_eV"], ens, rtol=0, atol=1e-12)
    assert r["v0_A3"] == pytest.approx(v0, rel=1e-8)
    assert r["B_GPa"] == pytest.approx(b / GPa, rel=1e-8)
    assert r["a0_A"] == pytest.approx(v0 ** (1 / 3), rel=1e-8)
    assert r["a0_A"] == pytest.approx(3.59, abs=0.01)  # EMT's Cu lattice constant
    assert 100 < r["B_GPa"] < 200
    bm = materials.equation_of_state(atoms, EMT(), eos="birchmurnaghan")
    assert bm["a0_A"] == pytest.approx(r["a0_A"], abs=2e-3)  # the two forms agree on a0


def test_lattice_constant_errors_model_vs_oracle():
    # oracle: EMT; "model": an analytic Murnaghan E(V) whose a0 is 2 % above EMT's, B = 120 GPa.
    structures = {"cu": bulk("Cu", "fcc", a=3.6, cubic=True), "cu_sc": bulk("Cu", "fcc", a=3.6, cubic=True)}
    oracle = materials.equation_of_state(structures["cu"], EMT())
    a_model = oracle["a0_A"] * 1.02
    model = VolumeOnly(murnaghan, -1.0, 120.0 * GPa, 5.0, a_model**3)
    out = materials.lattice_constant_errors(structures, model, EMT())
    assert out["n_structures"] == 2 and out["n_failed"] == 0
    row = out["structures"]["cu"]
    assert row["a0_error_A"] == pytest.approx(0.02 * oracle["a0_A"], rel=1e-3)
    assert row["a0_error_pct"] == pytest.approx(2.0, rel=1e-3)
    assert row["v0_error_pct"] == pytest.approx(100 * (1.02**3 - 1), rel=1e-3)
    assert row["B_error_GPa"] == pytest.approx(120.0 - oracle["B_GPa"], abs=0.5)
    assert out["summary"]["a0_error_A"]["mae"] == pytest.approx(row["a0_error_A"], rel=1e-9)
    assert out["summary"]["a0_error_A"]["max_abs"] == pytest.approx(row["a0_error_A"], rel=1e-9)
    # a model whose minimum is far away is a counted failure, not a number
    bad = VolumeOnly(murnaghan, -1.0, 120.0 * GPa, 5.0, 3 * a_model**3)
    out = materials.lattice_constant_errors([structures["cu"]], bad, EMT())
    assert out["n_failed"] == 1 and out["structures"]["0"]["a0_error_A"] is None
    assert out["summary"]["a0_error_A"]["n"] == 0


def test_eos_relax_positions_reports_it():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[0] += [0.05, -0.03, 0.02]  # off the lattice site: relaxation matters
    fixed = materials.equation_of_state(atoms, EMT(), n_points=7)
    relaxed = materials.equation_of_state(atoms, EMT(), n_points=7, relax_positions=True, fmax=1e-3)
    assert "relaxed" in relaxed["positions"] and "not relaxed" in fixed["positions"]
    assert relaxed["all_relaxed"] and len(relaxed["relaxation"]) == 7
    assert all(er < ef for er, ef in zip(relaxed["energies_eV"], fixed["energies_eV"]))
    perfect = materials.equation_of_state(bulk("Cu", "fcc", a=3.6, cubic=True), EMT(), n_points=7)
    np.testing.assert_allclose(relaxed["energies_eV"], perfect["energies_eV"], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# NEB: ASE's "Diffusion of a gold atom on Al(100)" with EMT
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def au_al100():
    slab = fcc100("Al", size=(2, 2, 3))
    add_adsorbate(slab, "Au", 1.7, "hollow")
    slab.center(axis=2, vacuum=4.0)
    slab.set_constraint(FixAtoms(mask=slab.get_tags() > 1))
    slab.calc = EMT()
    QuasiNewton(slab, logfile=None).run(fmax=0.05)
    initial = slab.copy()
    slab[-1].x += slab.get_cell()[0, 0] / 2
    QuasiNewton(slab, logfile=None).run(fmax=0.05)
    final = slab.copy()
    # the tutorial's NEB by hand: 3 images, linear interpolation, BFGS; climbing image for the saddle
    images = [initial.copy()] + [initial.copy() for _ in range(3)] + [final.copy()]
    for im in images:
        im.calc = EMT()
    neb = NEB(images, climb=True, method="improvedtangent")
    neb.interpolate()
    with BFGS(neb, logfile=None) as opt:
        assert opt.run(fmax=0.02, steps=500)
    barrier, de = NEBTools(images).get_barrier()
    return initial, final, images, float(barrier), float(de)


def test_neb_matches_hand_run_with_emt(au_al100):
    initial, final, _, barrier, de = au_al100
    r = materials.neb_barrier(initial, final, EMT, n_images=5, climb=True, fmax=0.02)
    assert r["converged"] and r["problem"] is None and r["n_steps"] > 0
    assert 0.30 < barrier < 0.45  # hand run: 0.374 eV
    assert r["barrier_forward_eV"] == pytest.approx(barrier, abs=5e-3)
    assert r["delta_E_eV"] == pytest.approx(de, abs=1e-6)
    assert r["barrier_reverse_eV"] == pytest.approx(barrier - de, abs=5e-3)
    assert r["barrier_max_image_eV"] <= r["barrier_forward_eV"] + 1e-6
    assert len(r["image_energies_eV"]) == 7
    assert initial.calc is None  # inputs keep their (absent) calculator
    # FIRE gets to the same saddle
    f = materials.neb_barrier(initial, final, EMT, n_images=3, optimizer="FIRE", interpolation="linear", fmax=0.02, steps=1000)
    assert f["converged"] and f["barrier_forward_eV"] == pytest.approx(barrier, abs=5e-3)


def test_neb_from_reference_path_and_shared_calculator(au_al100):
    _, _, images, barrier, _ = au_al100
    r = materials.neb_barrier(None, None, EMT(), path=images, fmax=0.05)  # one shared calculator
    assert r["start"] == "reference path" and r["n_images"] == 3
    assert r["converged"] and r["n_steps"] <= 2  # already on the converged band
    assert r["barrier_forward_eV"] == pytest.approx(barrier, abs=1e-6)


def test_neb_not_converged_is_reported_as_such(au_al100):
    initial, final, _, _, _ = au_al100
    r = materials.neb_barrier(initial, final, EMT, n_images=5, steps=2)
    assert r["converged"] is False
    assert r["barrier_forward_eV"] is None and r["barrier_reverse_eV"] is None
    assert "not converged" in r["problem"]
    assert r["unconverged_last_band"]["barrier_forward_eV"] is not None  # kept apart, labelled


# ---------------------------------------------------------------------------------------------
# Size extensivity, training rate, speed
# ---------------------------------------------------------------------------------------------
def test_size_extensivity_on_hand_made_arrays():
    rng = np.random.default_rng(0)
    ref = {}
    for name, n in (("small", 4), ("big", 32)):
        ref[name] = {"energy": rng.normal(size=3) * n, "forces": rng.normal(size=(3, n, 3)),
                     "stress": rng.normal(size=(3, 6)) * 1e-2, "n_atoms": np.full(3, n)}
    # errors chosen per pair: energy offset d_e eV/atom, force offset d_f eV/Å, stress offset d_s eV/Å^3
    offsets = {("small", "small"): (0.001, 0.02, 1e-4), ("small", "big"): (0.004, 0.05, 3e-4),
               ("big", "big"): (0.002, 0.03, 2e-4), ("big", "small"): (0.003, 0.04, 1e-4)}
    preds = {}
    for (tr, te), (de, df, ds) in offsets.items():
        r = ref[te]
        sign = np.where(rng.random(3) < 0.5, -1.0, 1.0)
        full = np.zeros((3, 3, 3))
        full[:, [0, 1, 2], [0, 1, 2]] = r["stress"][:, :3]
        full[:, 1, 2] = full[:, 2, 1] = r["stress"][:, 3]
        full[:, 0, 2] = full[:, 2, 0] = r["stress"][:, 4]
        full[:, 0, 1] = full[:, 1, 0] = r["stress"][:, 5]
        full -= ds  # every Voigt component (and its mirror) off by -ds
        preds[(tr, te)] = {"energy": r["energy"] + sign * de * r["n_atoms"],
                           "forces": list(r["forces"] + df),  # a list of frames works too
                           "stress": full}
    out = materials.size_extensivity(preds, ref)
    for (tr, te), (de, df, ds) in offsets.items():
        row = out["matrix"][f"{tr}->{te}"]
        assert row["energy_mae_meV_per_atom"] == pytest.approx(1e3 * de)
        assert row["force_mae_meV_per_A"] == pytest.approx(1e3 * df)
        assert row["stress_mae_meV_per_A3"] == pytest.approx(1e3 * ds)
    ratio = out["ratios"]["small->big / big->big"]
    assert ratio["energy_mae_meV_per_atom"] == pytest.approx(2.0)
    assert ratio["force_mae_meV_per_A"] == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="no reference"):
        materials.size_extensivity({("small", "huge"): preds[("small", "small")]}, ref)


def test_training_rate_matches_polyfit_on_noisy_power_law():
    rng = np.random.default_rng(7)
    sizes = np.array([50, 100, 200, 400, 800])
    truth = {"energy": (-0.6, 2.0), "forces": (-0.35, 120.0), "stress": (-0.2, 5.0)}
    errors = {q: c * sizes**s * np.exp(rng.normal(0, 0.05, sizes.size)) for q, (s, c) in truth.items()}
    out = materials.training_rate(sizes, errors)
    for q, (s, c) in truth.items():
        fit = out["fits"][q]
        (p1, p0), cov = np.polyfit(np.log10(sizes), np.log10(errors[q]), 1, cov=True)
        assert fit["slope"] == pytest.approx(p1, rel=1e-10)
        assert fit["intercept_log10"] == pytest.approx(p0, rel=1e-10)
        assert fit["slope_stderr"] == pytest.approx(np.sqrt(cov[0, 0]), rel=1e-8)
        assert fit["intercept_stderr"] == pytest.approx(np.sqrt(cov[1, 1]), rel=1e-8)
        assert abs(fit["slope"] - s) < 4 * fit["slope_stderr"] + 0.02  # recovers the true exponent
    # exact power law: slope exact, zero error; missing values are dropped
    exact = materials.training_rate(sizes, {"energy": 3.0 * sizes**-0.5, "stress": [None] * 5})
    assert exact["fits"]["energy"]["slope"] == pytest.approx(-0.5, rel=1e-12)
    assert exact["fits"]["energy"]["slope_stderr"] == pytest.approx(0.0, abs=1e-12)
    assert exact["fits"]["energy"]["intercept_log10"] == pytest.approx(np.log10(3.0), rel=1e-12)
    assert exact["fits"]["stress"]["slope"] is None and exact["fits"]["stress"]["n_points"] == 0
    two = materials.training_rate([10, 20], [1.0, 0.5])["fit"]
    assert two["slope"] == pytest.approx(-1.0) and two["slope_stderr"] is None


def test_speed_in_katoms_per_s():
    assert materials.katoms_per_s(2.5e6) == 2500.0
    s = materials.inference_speed(n_atoms=100, n_steps=1000, seconds=4.0, n_replicas=5)
    assert s["atom_steps_per_s"] == pytest.approx(125_000.0) and s["katoms_per_s"] == pytest.approx(125.0)


# ---------------------------------------------------------------------------------------------
# Through the jaxbench model calculator
# ---------------------------------------------------------------------------------------------
def test_eos_runs_through_jaxbench_calculator():
    import jax
    import jax.numpy as jnp

    from jaxbench.calculator import JaxbenchCalculator
    from jaxbench.graph import build_graphs
    from jaxbench.io import frames_from_atoms
    from jaxbench.potential import Potential, model_cards
    from jaxbench.stats import compute_statistics

    cards = model_cards()
    if "mace-small" not in cards:
        pytest.skip("no mace-small card")
    t0 = time.perf_counter()
    card = cards["mace-small"]
    labelled = []
    for x in (0.97, 1.0, 1.03):
        a = bulk("Cu", "fcc", a=3.6 * x, cubic=True)
        a.rattle(0.05, seed=int(100 * x))  # non-zero forces: the model's scale is the force RMS
        a.calc = EMT()
        a.get_forces(), a.get_stress()
        labelled.append(a)
    frames = frames_from_atoms(labelled)
    stats = compute_statistics(frames, float(card["hyperparameters"]["r_max"]))
    pot = Potential.from_card(card, stats)
    g = build_graphs(frames[:1], pot.r_max).batch([0])
    params = pot.init(jax.random.PRNGKey(0), g, dtype=jnp.float32)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    # a flat E(V) from the model is flagged rather than fitted
    flat = materials.equation_of_state(atoms, VolumeOnly(lambda v, e0, *_: e0, 0.5, 0, 0, 0), n_points=5)
    assert not flat["ok"] and "flat" in flat["problem"] and flat["a0_A"] is None
    # perturbed weights (as tests/test_calculator.py) give a volume-dependent energy
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    calc = JaxbenchCalculator(pot, params, dtype=jnp.float32)
    r = materials.equation_of_state(atoms, calc, n_points=5)
    assert len(r["energies_eV"]) == 5 and np.all(np.isfinite(r["energies_eV"]))
    assert np.ptp(r["energies_eV"]) > 1e-4
    # the same calculator, point by point, by hand
    a = atoms.copy()
    a.set_cell(atoms.cell * 0.9 ** (1 / 3), scale_atoms=True)
    a.calc = calc
    assert r["energies_eV"][0] == pytest.approx(a.get_potential_energy(), rel=1e-6, abs=1e-6)
    assert isinstance(r["ok"], bool) and (r["ok"] or r["problem"])  # untrained: a fit or a stated failure
    assert time.perf_counter() - t0 < 60
