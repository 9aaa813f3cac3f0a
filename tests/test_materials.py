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


# ---------------------------------------------------------------------------------------------
# Volume at temperature (NPT): ASE's IsotropicMTKNPT (oracle) and jaxbench.md (model)
# ---------------------------------------------------------------------------------------------
SIGMA, EPS, RC = 3.405, 0.0104, 7.0  # argon, as tests/test_md_npt.py


class ForceShiftedLJ(Calculator):
    """NumPy force-shifted Lennard-Jones, exactly ``jaxbench.md.lennard_jones``: pair energy
    lj(r) - lj(rc) - (r - rc) lj'(rc) for r < rc; energy, forces and (virial) stress. Dense over the
    periodic images a pair within rc can have (fine for tens of atoms; ASE's neighbour list costs 30 ms)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, sigma=SIGMA, epsilon=EPS, cutoff=RC, **kw):
        super().__init__(**kw)
        self.sigma, self.epsilon, self.rc = sigma, epsilon, cutoff

    def lj(self, x):
        return 4 * self.epsilon * ((self.sigma / x) ** 12 - (self.sigma / x) ** 6)

    def dlj(self, x):
        return 4 * self.epsilon * (-12 * self.sigma**12 / x**13 + 6 * self.sigma**6 / x**7)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a, rc = self.atoms, self.rc
        cell = np.array(a.cell)
        s = a.get_scaled_positions(wrap=False)
        ds = s[None, :, :] - s[:, None, :]  # [i, j] fractional r_j - r_i, nearest image ...
        ds -= np.round(ds)
        heights = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)  # ... plus every image shift within rc
        m = np.floor(rc / heights + 0.5).astype(int)
        shifts = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in m], indexing="ij"), -1).reshape(-1, 3)
        D = (ds[:, :, None, :] + shifts[None, None]) @ cell  # [i, j, image, 3]
        d = np.linalg.norm(D, axis=-1)
        keep = (d < rc) & (d > 1e-8)
        i = np.nonzero(keep)[0]
        D, d = D[keep], d[keep]
        e = 0.5 * np.sum(self.lj(d) - self.lj(rc) - (d - rc) * self.dlj(rc))  # every pair twice
        g = (self.dlj(d) - self.dlj(rc))[:, None] * D / d[:, None]  # d(pair)/d r_j; force on i is +g
        f = np.zeros((len(a), 3))
        np.add.at(f, i, g)
        stress = 0.5 * (D.T @ g) / a.get_volume()
        self.results.update(energy=e, free_energy=e, forces=f, stress=stress.flat[[0, 4, 8, 5, 2, 1]])


def argon(a=5.5):
    return bulk("Ar", "fcc", a=a, cubic=True).repeat(2)  # 32 atoms, cell 2a


NPT_KEYS = {"method", "n_atoms", "v_input_A3", "a_input_A", "volume_A3", "volume_per_atom_A3", "volume_stderr_A3",
            "volume_per_atom_stderr_A3", "stderr_method", "pressure_bar", "pressure_stderr_bar", "temperature_K",
            "linear_scale", "cell_lengths_A", "a_A", "a_stderr_A", "n_samples", "ok", "problem", "n_blocks",
            "temperature_target_K", "pressure_target_bar", "timestep_fs", "steps", "equilibration_steps",
            "sample_every", "seed", "n_replicas"}


def check_npt_bookkeeping(r, atoms, a_in):
    assert NPT_KEYS <= set(r), NPT_KEYS - set(r)
    assert r["ok"] and r["problem"] is None, r["problem"]
    for k in ("volume_A3", "volume_stderr_A3", "pressure_bar", "pressure_stderr_bar", "temperature_K", "a_A"):
        assert isinstance(r[k], float) and np.isfinite(r[k]), k
    n = len(atoms)
    assert r["n_atoms"] == n and r["v_input_A3"] == pytest.approx(atoms.get_volume(), rel=1e-12)
    assert r["volume_per_atom_A3"] == pytest.approx(r["volume_A3"] / n, rel=1e-12)
    assert r["volume_per_atom_stderr_A3"] == pytest.approx(r["volume_stderr_A3"] / n, rel=1e-12)
    s = (r["volume_A3"] / atoms.get_volume()) ** (1 / 3)
    assert r["linear_scale"] == pytest.approx(s, rel=1e-12) and r["a_input_A"] == a_in
    assert r["a_A"] == pytest.approx(a_in * s, rel=1e-12)
    assert r["a_stderr_A"] == pytest.approx(r["a_A"] * r["volume_stderr_A3"] / (3 * r["volume_A3"]), rel=1e-12)
    np.testing.assert_allclose(r["cell_lengths_A"], np.linalg.norm(atoms.cell, axis=1) * s, rtol=1e-12)
    assert r["volume_stderr_A3"] > 0
    assert r["n_samples"] == r["n_replicas"] * r["steps"] // r["sample_every"]


def test_npt_volume_ase_bookkeeping_on_emt_cu():
    """A short ASE run with EMT: finite, keys and units, the volume near EMT's own equilibrium volume."""
    t0 = time.perf_counter()
    cell = bulk("Cu", "fcc", a=3.6, cubic=True)  # 4 atoms (EMT in ASE costs ~8 ms per MD step)
    eos = materials.equation_of_state(cell, EMT())
    r = materials.npt_volume_ase(cell, EMT(), 100.0, timestep_fs=5.0, steps=400, equilibration_steps=100,
                                 sample_every=5, n_blocks=8, tdamp_fs=100.0, pdamp_fs=500.0, seed=3)
    check_npt_bookkeeping(r, cell, 3.6)
    assert r["n_samples"] == 80 and r["n_blocks"] == 8 and "8 blocks of 10" in r["stderr_method"]
    assert r["tdamp_fs"] == 100.0 and r["pdamp_fs"] == 500.0 and r["method"] == "ase IsotropicMTKNPT"
    # 100 K on EMT Cu: thermal expansion of a fraction of a percent over the 0 K EOS minimum
    assert abs(r["volume_A3"] / eos["v0_A3"] - 1) < 0.02, (r["volume_A3"], eos["v0_A3"])
    assert r["a_A"] ** 3 == pytest.approx(r["volume_A3"], rel=1e-12)  # the cubic cell's edge
    assert 60 < r["temperature_K"] < 140  # 4 atoms: large fluctuations, but thermostatted near 100 K
    assert abs(r["pressure_bar"]) < 4 * r["pressure_stderr_bar"] + 2000  # 4 atoms: kbar fluctuations
    assert np.allclose(cell.cell, np.eye(3) * 3.6) and cell.calc is None  # input untouched
    # the default couplings are 100 and 1000 timesteps
    d = materials.npt_volume_ase(cell, EMT(), 100.0, timestep_fs=1.0, steps=20, equilibration_steps=0,
                                 sample_every=2, n_blocks=2)
    assert d["ok"] and d["tdamp_fs"] == 100.0 and d["pdamp_fs"] == 1000.0 and d["n_samples"] == 10
    print(f"EMT Cu 100 K: V/atom {r['volume_per_atom_A3']:.4f} +- {r['volume_per_atom_stderr_A3']:.4f} A^3 "
          f"(EOS v0/atom {eos['v0_A3'] / 4:.4f}), a {r['a_A']:.4f} A, {time.perf_counter() - t0:.1f} s")


def test_force_shifted_lj_calculator_is_the_md_potential():
    """The test's oracle calculator: energy against ASE's neighbour list, forces and stress against
    finite differences (a rattled, partly unwrapped argon cell)."""
    from ase.neighborlist import neighbor_list

    at = argon()
    at.rattle(0.1, seed=1)
    at.positions[3] += at.cell[0] * 1.3  # unwrapped positions are read as their images
    calc = ForceShiftedLJ()
    at.calc = calc
    e, f, s = at.get_potential_energy(), at.get_forces(), at.get_stress()
    d = neighbor_list("d", at, RC)
    assert e == pytest.approx(0.5 * np.sum(calc.lj(d) - calc.lj(RC) - (d - RC) * calc.dlj(RC)), rel=1e-12)
    h = 1e-5

    def energy(positions=None, strain=None):
        b = at.copy()
        b.calc = ForceShiftedLJ()
        if positions is not None:
            b.positions = positions
        if strain is not None:
            b.set_cell(at.cell @ (np.eye(3) + strain), scale_atoms=True)
        return b.get_potential_energy()

    for k, c in ((3, 0), (3, 2), (17, 1)):
        dx = np.zeros_like(at.positions)
        dx[k, c] = h
        assert f[k, c] == pytest.approx(-(energy(at.positions + dx) - energy(at.positions - dx)) / (2 * h), abs=1e-7)
    v = at.get_volume()
    for voigt, (p, q) in ((0, (0, 0)), (2, (2, 2)), (5, (0, 1))):
        eps = np.zeros((3, 3))
        eps[p, q] = eps[q, p] = h if p == q else h / 2
        assert s[voigt] == pytest.approx((energy(strain=eps) - energy(strain=-eps)) / (2 * h) / v, abs=1e-8)


def test_volume_errors_arithmetic_on_hand_made_results():
    def res(v, se, a=None, ok=True, problem=None):
        return {"ok": ok, "problem": problem, "volume_A3": v, "volume_stderr_A3": se, "a_A": a}

    pairs = {
        "x": (res(1000.0, 3.0, a=10.0), res(1020.0, 4.0, a=10.0 * 1.02 ** (1 / 3))),
        "y": (res(500.0, 1.0), res(495.0, 0.0)),  # not cubic: no lattice constant
        "z": (res(800.0, 2.0, a=9.0), res(None, None, ok=False, problem="replica 0 failed at step 40: volume")),
    }
    out = materials.volume_errors(pairs)
    assert out["n_structures"] == 3 and out["n_failed"] == 1
    x, y, z = (out["structures"][k] for k in "xyz")
    assert x["ok"] and x["volume_error_pct"] == pytest.approx(2.0)
    assert x["volume_error_stderr_pct"] == pytest.approx(0.5)  # 100 * hypot(3, 4) / 1000
    assert x["volume_error_z"] == pytest.approx(4.0)  # 20 / 5
    assert x["a_error_A"] == pytest.approx(10.0 * (1.02 ** (1 / 3) - 1))
    assert x["a_error_pct"] == pytest.approx(100 * (1.02 ** (1 / 3) - 1))
    assert y["volume_error_pct"] == pytest.approx(-1.0) and y["a_error_A"] is None
    assert y["volume_error_z"] == pytest.approx(-5.0)
    assert not z["ok"] and z["volume_error_pct"] is None
    assert z["problem"] == "model: replica 0 failed at step 40: volume"
    sv = out["summary"]["volume_error_pct"]
    assert sv["n"] == 2 and sv["mae"] == pytest.approx(1.5) and sv["max_abs"] == pytest.approx(2.0)
    assert sv["mean"] == pytest.approx(0.5)
    assert out["summary"]["a_error_pct"]["n"] == 1
    assert out["summary"]["a_error_A"]["mae"] == pytest.approx(x["a_error_A"])
    # block standard error by hand: 4 blocks of 3 (the first 2 of 14 samples dropped)
    xs = np.arange(14.0) ** 2
    means = xs[2:].reshape(4, 3).mean(axis=1)
    assert materials.block_stderr(xs, 4) == pytest.approx(means.std(ddof=1) / 2)


def test_volume_at_temperature_passes_each_route_its_settings(monkeypatch):
    """The keyword routing of volume_at_temperature, with both routes replaced by recorders."""
    calls = []

    def fake(route, v):
        def run(*args, **kw):
            atoms, other = (args[0], args[1]) if route == "ase" else (args[1], args[0])
            assert other == ("oracle" if route == "ase" else "model") and args[2] == 300.0
            calls.append((route, atoms, kw))
            return {"ok": True, "problem": None, "volume_A3": v, "volume_stderr_A3": 1.0, "a_A": None}
        return run

    monkeypatch.setattr(materials, "npt_volume_ase", fake("ase", 100.0))
    monkeypatch.setattr(materials, "npt_volume_jaxbench", fake("jaxbench", 103.0))
    s = {"cu": bulk("Cu", "fcc", a=3.6, cubic=True), "al": bulk("Al", "fcc", a=4.05, cubic=True).repeat(2)}
    out = materials.volume_at_temperature(s, "model", "oracle", 300.0, params={"w": 1}, steps=50, seed=2,
                                          tau_fs=80.0, barostat_tau_fs=800.0, replicas=3,
                                          lattice_constant={"al": 4.05}, oracle_kw={"tchain": 1},
                                          model_kw={"devices": 1})
    assert [(r, a is s[n]) for (r, a, _), n in zip(calls, ["cu", "cu", "al", "al"])] == [
        ("ase", True), ("jaxbench", True), ("ase", True), ("jaxbench", True)]
    (_, _, ase_cu), (_, _, jax_cu), (_, _, ase_al), (_, _, jax_al) = calls
    assert ase_cu == {"steps": 50, "seed": 2, "tdamp_fs": 80.0, "pdamp_fs": 800.0, "tchain": 1, "lattice_constant": None}
    assert jax_cu == {"steps": 50, "seed": 2, "tau_fs": 80.0, "barostat_tau_fs": 800.0, "replicas": 3, "devices": 1,
                      "params": {"w": 1}, "lattice_constant": None}
    assert ase_al["lattice_constant"] == jax_al["lattice_constant"] == 4.05
    assert out["n_structures"] == 2 and out["summary"]["volume_error_pct"]["mae"] == pytest.approx(3.0)


def test_npt_volume_refuses_bad_input():
    from jaxbench import md

    mol = bulk("Cu", "fcc", a=3.6, cubic=True)
    mol.pbc = [True, True, False]
    with pytest.raises(ValueError, match="periodic in all three"):
        materials.npt_volume_ase(mol, EMT(), 300.0)
    with pytest.raises(ValueError, match="periodic in all three"):
        materials.npt_volume_jaxbench(md.lennard_jones(), mol, 300.0)
    with pytest.raises(ValueError, match="periodic in all three"):
        materials.volume_at_temperature({"slab": mol}, md.lennard_jones(), EMT(), 300.0)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    with pytest.raises(ValueError, match="multiple of sample_every"):
        materials.npt_volume_ase(cu, EMT(), 300.0, steps=105, sample_every=10)
    with pytest.raises(ValueError, match="n_blocks"):
        materials.npt_volume_jaxbench(md.lennard_jones(), cu, 300.0, steps=50, sample_every=10, n_blocks=10, replicas=1)
    with pytest.raises(ValueError, match="temperature_K"):
        materials.npt_volume_ase(cu, EMT(), 0.0)
    with pytest.raises(ValueError, match="no stress"):
        materials.npt_volume_ase(cu, VolumeOnly(murnaghan, 0.0, 1.0, 4.0, 47.0), 300.0, steps=100)
    with pytest.raises(ValueError, match="unknown keyword"):
        materials.volume_at_temperature([cu], md.lennard_jones(), EMT(), 300.0, tdamp_fs=100.0)


class BlowsUp(ForceShiftedLJ):
    """The LJ calculator until its ``after``-th call, then NaN energy, forces, stress (a model off its domain)."""

    def __init__(self, after, **kw):
        super().__init__(**kw)
        self.after, self.calls = after, 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        if self.calls > self.after:
            for k in ("energy", "free_energy"):
                self.results[k] = np.nan
            for k in ("forces", "stress"):
                self.results[k] = np.full_like(self.results[k], np.nan)


def test_npt_volume_flags_failed_runs(monkeypatch):
    """A run that turns non-finite (ASE route) or loses a replica (model route) is flagged with no numbers."""
    import types

    from jaxbench import md
    from jaxbench.md.failures import FAILURE_REASONS

    at = argon()
    kw = dict(timestep_fs=5.0, steps=100, equilibration_steps=20, sample_every=10, n_blocks=5, lattice_constant=5.5)
    r = materials.npt_volume_ase(at, BlowsUp(after=60), 40.0, **kw)
    assert r["ok"] is False and "non-finite" in r["problem"] and "at step" in r["problem"]
    assert r["volume_A3"] is None and r["a_A"] is None and r["volume_stderr_A3"] is None
    # the model route: md.simulate's result as it reports a replica stopped by the volume criterion
    volume_bit = next(k for k, v in FAILURE_REASONS.items() if "max_compression" in v)
    steps = np.arange(0, 121, 10)

    fail = {"replica": True}

    def fake_simulate(model, start, protocol, **kw):
        assert protocol.ensemble == "npt_nose_hoover" and protocol.steps == 120 and protocol.save_every == 10
        assert start.n_replicas == 3 and kw["seed"] == 0
        v = np.full((3, steps.size), 1331.0)
        if not fail["replica"]:
            v[2, -1] = np.nan
        return types.SimpleNamespace(arrays={"step": steps, "volume": v, "pressure": v * 0, "temperature": v * 0 + 40},
                                     failed=np.array([False, fail["replica"], False]),
                                     failure_step=np.array([-1, 70 if fail["replica"] else -1, -1]),
                                     failure_reason=np.array([0, volume_bit if fail["replica"] else 0, 0]))

    monkeypatch.setattr(md, "simulate", fake_simulate)
    m = materials.npt_volume_jaxbench(md.lennard_jones(), at, 40.0, replicas=3, **kw)
    assert m["ok"] is False and m["failed_replicas"] == [1] and m["volume_A3"] is None
    assert m["problem"].startswith("replica 1 failed at step 70: ") and "max_compression" in m["problem"]
    fail["replica"] = False
    nan = materials.npt_volume_jaxbench(md.lennard_jones(), at, 40.0, replicas=3, **kw)
    assert nan["ok"] is False and "non-finite" in nan["problem"] and nan["failed_replicas"] == []
    out = materials.volume_errors({"ar": (r, m)})
    assert out["n_failed"] == 1 and out["summary"]["volume_error_pct"]["n"] == 0
    assert out["structures"]["ar"]["problem"].startswith("oracle: non-finite")


@pytest.mark.slow
def test_npt_volume_lj_argon_ase_and_jaxbench_agree():
    """The same force-shifted LJ argon solid (32 atoms) at 40 K and 1 bar through both routes
    (volume_at_temperature, model = md.lennard_jones, oracle = the NumPy calculator): the mean volumes
    agree within 3 combined standard errors and 1 %. Measured: see the printed line."""
    from jaxbench import md

    t0 = time.perf_counter()
    out = materials.volume_at_temperature(
        {"ar": argon()}, md.lennard_jones(SIGMA, EPS, RC), ForceShiftedLJ(), 40.0, pressure_bar=1.0, timestep_fs=5.0,
        steps=10000, equilibration_steps=1000, sample_every=10, n_blocks=20, tau_fs=100.0, barostat_tau_fs=500.0,
        replicas=4, seed=4, lattice_constant=5.5)
    row = out["structures"]["ar"]
    ref, mod = row["oracle"], row["model"]
    assert out["n_failed"] == 0, row.get("problem")
    se = np.hypot(ref["volume_stderr_A3"], mod["volume_stderr_A3"])
    dv = mod["volume_A3"] - ref["volume_A3"]
    msg = (f"V ASE {ref['volume_A3']:.2f} +- {ref['volume_stderr_A3']:.2f}, jaxbench {mod['volume_A3']:.2f} +- "
           f"{mod['volume_stderr_A3']:.2f} A^3 (diff {dv:+.2f}, {row['volume_error_pct']:+.3f} %, "
           f"z {row['volume_error_z']:+.2f}); "
           f"P {ref['pressure_bar']:.1f} +- {ref['pressure_stderr_bar']:.1f} / {mod['pressure_bar']:.1f} +- "
           f"{mod['pressure_stderr_bar']:.1f} bar; T {ref['temperature_K']:.2f} / {mod['temperature_K']:.2f} K; "
           f"{time.perf_counter() - t0:.0f} s")
    print(msg)
    for r in (ref, mod):
        check_npt_bookkeeping(r, argon(), 5.5)
        assert abs(r["temperature_K"] - 40.0) < 1.0
        assert abs(r["pressure_bar"] - 1.0) < 4 * r["pressure_stderr_bar"] + 5.0
    assert ref["tdamp_fs"] == mod["tau_fs"] == pytest.approx(100.0)
    assert ref["pdamp_fs"] == mod["barostat_tau_fs"] == pytest.approx(500.0)
    assert abs(dv) < 3 * se, msg
    assert abs(row["volume_error_pct"]) < 1.0, msg
    assert row["a_error_pct"] == pytest.approx(100 * ((1 + row["volume_error_pct"] / 100) ** (1 / 3) - 1), rel=1e-9)
    assert out["summary"]["volume_error_pct"]["mae"] == pytest.approx(abs(row["volume_error_pct"]))


@pytest.mark.slow
def test_npt_volume_jaxbench_flags_a_replica_compressed_past_the_list():
    """20 kbar on the LJ argon solid (bulk modulus ~1 GPa) compresses it past max_compression in 3 steps: flagged."""
    from jaxbench import md

    t0 = time.perf_counter()
    r = materials.npt_volume_jaxbench(md.lennard_jones(SIGMA, EPS, RC), argon(), 40.0, pressure_bar=2e4,
                                      timestep_fs=5.0, steps=2000, equilibration_steps=0, replicas=2,
                                      barostat_tau_fs=500.0, tau_fs=100.0, max_compression=0.1, devices=1)
    print(r["problem"], f"{time.perf_counter() - t0:.0f} s")
    assert r["ok"] is False and r["volume_A3"] is None and r["failed_replicas"] == [0, 1]
    assert "max_compression" in r["problem"]
