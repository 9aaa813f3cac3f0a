"""MS25 materials observables: equation of state, NEB barriers, size extensivity, data training rate, speed.

Every observable that needs energies takes an ASE calculator, so the same function runs with a model
(:class:`jaxbench.calculator.JaxbenchCalculator`) and with the oracle (e.g. ASE's ``EMT``); the
model-vs-oracle comparison is then a difference of two plain result dicts. Results are plain dicts
of Python floats / lists (JSON-ready), every key carrying its unit: ``_A`` Å, ``_A3`` Å^3, ``_eV``,
``_GPa``, ``_pct`` percent, ``_meV_per_atom``, ``_meV_per_A``, ``_meV_per_A3``.

Definitions (MS25 = Maxson et al., "MS25: materials science benchmark for MLIPs")
-------------------------------------------------------------------------------

EOS (:func:`equation_of_state`)
    The cell is scaled isotropically (positions with it, fractional coordinates kept) to volumes
    ``V_in * (1 + x)`` for ``x`` in ``linspace(-strain, strain, n_points)`` (MS25: +-10 % of the
    reference volume, Murnaghan fit with ``ase.eos``); ``scan="lattice"`` scales the lattice
    vectors by ``1 + x`` instead. The energies are fitted with ``ase.eos.EquationOfState``
    (``murnaghan`` by default, ``birchmurnaghan`` or any other ``ase.eos.eos_names`` entry).
    ``B`` is converted from eV/Å^3 to GPa with ``ase.units`` (``B / kJ * 1e24``). The equilibrium
    linear scale is ``s0 = (v0 / V_in)^(1/3)``; the cell lengths at equilibrium are ``s0 * |a_i|``,
    and the lattice constant ``a0 = a_in * s0`` where ``a_in`` is given, or, for a cubic cell, its
    edge (so pass ``lattice_constant=`` for a cubic *supercell*; None for non-cubic cells without
    it). With ``relax_positions=True`` the positions are relaxed at each (fixed) volume with
    ``ase.optimize.BFGS`` to ``fmax`` from the scaled input positions; the result says which, with
    each point's convergence. A fit that fails, or whose minimum lies outside the scanned volumes,
    or a flat or non-finite energy curve, is flagged (``ok: False`` with ``problem``), never silently returned.
NEB (:func:`neb_barrier`)
    ASE's :class:`ase.mep.NEB` (``improvedtangent`` tangent, climbing image by default), optimised
    with BFGS (ASE's tutorial) or FIRE, ``fmax`` in eV/Å on the NEB forces. The band starts from a
    given reference path (MS25 started from the DFT path) or from an IDPP (default) or linear
    interpolation between ``initial`` and ``final``. The forward barrier is the maximum of
    ASE's :class:`ase.mep.NEBTools` spline fit minus the initial image's energy (``fit=True``;
    ``barrier_max_image_eV`` is the highest image, no spline), the reverse barrier is the forward
    barrier minus ``dE = E_final - E_initial``. A band that did not reach ``fmax`` within
    ``steps`` (or produced a non-finite energy) is reported as ``converged: False`` with the
    barriers ``None``; the last band's numbers are kept under ``unconverged_last_band`` only.
Size extensivity (:func:`size_extensivity`) — MS25 Figure 4
    Per-atom energy MAE ``mean_f |E_pred - E_ref| / N_f`` (meV/atom), force MAE over all
    components (meV/Å), stress MAE over the 6 Voigt components (meV/Å^3), for every
    (train size -> test size) pair given; pure numpy on given predictions.
Data training rate (:func:`training_rate`) — MS25 Table 8
    Least-squares line ``log10(err) = intercept + slope * log10(N)``; the slope's standard error
    is ``sqrt(RSS / (n - 2) / sum (x - mean x)^2)`` (the same as ``numpy.polyfit(..., cov=True)``).
    Dimensionless; needs >= 3 points for an error.
Speed — MS25 Figure 7
    katoms/s = atom-steps/s / 1000 (:func:`katoms_per_s`, :func:`inference_speed`).
Volume at temperature — MS25's zeolite / crystal volume error (:func:`volume_at_temperature`)
    The mean cell volume of an isotropic NPT run (the cell keeps its shape, scales with the volume):
    the oracle through ASE's ``IsotropicMTKNPT`` with an ASE calculator (:func:`npt_volume_ase`), the
    model through ``jaxbench.md.simulate`` with ``ensemble="npt_nose_hoover"`` (jax-md's isotropic MTK;
    :func:`npt_volume_jaxbench`) — the same
    Martyna-Tuckerman-Klein equations, Nosé-Hoover chains (3) on particles and barostat, coupling
    times ``tdamp_fs`` / ``tau_fs`` (default 100 dt) and ``pdamp_fs`` / ``barostat_tau_fs`` (default
    1000 dt; ASE's advice and the protocol's defaults). Both start from the input positions and cell
    with Maxwell-Boltzmann velocities at ``temperature_K`` from ``seed`` (zero total momentum), run
    ``equilibration_steps`` that are discarded, then ``steps`` sampled every ``sample_every`` steps
    (``steps // sample_every`` samples per trajectory). Reported: mean volume ``volume_A3`` (and per
    atom), mean pressure ``pressure_bar`` (virial plus kinetic, bar) and temperature
    ``temperature_K`` (kinetic, 3N degrees of freedom) over the samples; the volume's standard error
    is the spread of the independent replicas' means, ``std(ddof=1) / sqrt(R)``, when ``R >= 2``
    replicas ran (the model route), else from ``n_blocks`` contiguous block means of the one
    trajectory (``std(ddof=1) / sqrt(n_blocks)``; leading samples that do not fill a block are
    dropped); ``stderr_method`` says which. The lattice-constant equivalent is ``a = a_in *
    (V / V_in)^(1/3)`` with ``a_in`` as for the EOS (cube root of the mean volume; its standard error
    ``a * se_V / (3 V)``). Volume error (%) = ``100 (V_model - V_oracle) / V_oracle``, with its
    standard error from the two; a run that produced non-finite values, left the volume range, or
    (model route) lost a replica to a failure criterion is flagged (``ok: False`` with ``problem``) with
    no numbers, and counted in ``n_failed``. New unit suffixes: ``_bar``, ``_K``, ``_fs``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ase import units
from ase.calculators.calculator import Calculator

from .frames import full_to_voigt

EV_PER_A3_TO_GPA = 1.0e24 / units.kJ  # 1 eV/Å^3 = 160.2 GPa
EOS_FORMS = ("murnaghan", "birchmurnaghan")


def _f(x) -> float | None:
    return None if x is None else float(x)


# ---------------------------------------------------------------------------------------------
# Equation of state
# ---------------------------------------------------------------------------------------------
def _cubic_edge(cell: np.ndarray, tol: float = 1e-6) -> float | None:
    lengths = np.linalg.norm(cell, axis=1)
    off = cell - np.diag(np.diag(cell))
    if np.abs(off).max() > tol * lengths.max() or np.ptp(lengths) > tol * lengths.max():
        return None
    return float(lengths[0])


def fit_eos(volumes, energies, eos: str = "murnaghan", min_energy_range: float = 1e-6) -> dict[str, Any]:
    """Fit E(V) with ``ase.eos.EquationOfState``; v0 (Å^3), e0 (eV), B (GPa), and whether it is usable.

    A scan whose energies span less than ``min_energy_range`` eV is flat (e.g. an untrained model
    that ignores the volume): flagged, not fitted.
    """
    from ase.eos import EquationOfState, eos_names

    if eos not in eos_names:
        raise ValueError(f"unknown EOS form '{eos}'; ase.eos knows {', '.join(eos_names)}")
    v = np.asarray(volumes, dtype=np.float64)
    e = np.asarray(energies, dtype=np.float64)
    out: dict[str, Any] = {"eos": eos, "v0_A3": None, "e0_eV": None, "B_GPa": None, "ok": False, "problem": None}
    if not np.all(np.isfinite(e)):
        out["problem"] = "non-finite energy in the scan"
        return out
    if np.ptp(e) < min_energy_range:
        out["problem"] = f"flat energy curve (energies span {np.ptp(e):.3g} eV < {min_energy_range:g} eV)"
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ase warns when v0 is outside the scan: checked below
            v0, e0, b = EquationOfState(v, e, eos=eos).fit(warn=False)
    except (RuntimeError, ValueError, TypeError, np.linalg.LinAlgError) as err:  # curve_fit failures
        out["problem"] = f"fit failed: {err}"
        return out
    out.update(v0_A3=float(v0), e0_eV=float(e0), B_GPa=float(b) * EV_PER_A3_TO_GPA)
    if not (np.isfinite(v0) and np.isfinite(e0) and np.isfinite(b)):
        out["problem"] = "fit returned non-finite parameters"
    elif not (v.min() < v0 < v.max()):
        out["problem"] = f"minimum at {float(v0):.4g} Å^3 is outside the scanned volumes [{v.min():.4g}, {v.max():.4g}]"
    elif b <= 0:
        out["problem"] = "non-positive bulk modulus (no minimum)"
    else:
        out["ok"] = True
    return out


def equation_of_state(atoms, calc: Calculator, strain: float = 0.10, n_points: int = 11, eos: str = "murnaghan",
                      relax_positions: bool = False, fmax: float = 0.01, relax_steps: int = 200,
                      scan: str = "volume", lattice_constant: float | None = None) -> dict[str, Any]:
    """Energies over an isotropic +-``strain`` scan of ``atoms``' cell with ``calc``, fitted with ``ase.eos``.

    ``atoms`` is not modified. Returns v0 (Å^3), e0 (eV), B (GPa), the equilibrium linear scale,
    cell lengths and lattice constant (Å, see the module docstring), the input volume, and the
    per-point volumes / energies (and, with ``relax_positions``, each point's BFGS convergence).
    """
    if not atoms.pbc.all():
        raise ValueError("equation_of_state needs a cell periodic in all three directions")
    if n_points < 5:
        raise ValueError("an EOS fit with 4 parameters needs at least 5 points")
    if scan not in ("volume", "lattice"):
        raise ValueError("scan must be 'volume' or 'lattice'")
    x = np.linspace(-strain, strain, n_points)
    linear = (1.0 + x) ** (1.0 / 3.0) if scan == "volume" else 1.0 + x
    cell0 = np.array(atoms.cell)
    v_in = float(atoms.get_volume())
    a_in = lattice_constant if lattice_constant is not None else _cubic_edge(cell0)

    volumes, energies, relax = [], [], []
    for s in linear:
        at = atoms.copy()
        at.set_cell(cell0 * s, scale_atoms=True)
        at.calc = calc
        if relax_positions:
            from ase.optimize import BFGS

            with BFGS(at, logfile=None) as opt:
                conv = bool(opt.run(fmax=fmax, steps=relax_steps))
                relax.append({"converged": conv, "steps": int(opt.get_number_of_steps())})
        volumes.append(float(at.get_volume()))
        energies.append(float(at.get_potential_energy()))

    out: dict[str, Any] = {
        "eos": eos,
        "scan": f"isotropic {scan} scan, +-{100 * strain:g} %, {n_points} points",
        "positions": (f"relaxed at each volume (BFGS, fmax {fmax} eV/Å, <= {relax_steps} steps)" if relax_positions
                      else "scaled with the cell (not relaxed)"),
        "n_atoms": len(atoms),
        "v_input_A3": v_in,
        "volumes_A3": volumes,
        "energies_eV": energies,
    }
    if relax_positions:
        out["relaxation"] = relax
        out["all_relaxed"] = all(r["converged"] for r in relax)
    fit = fit_eos(volumes, energies, eos)
    out.update({k: fit[k] for k in ("v0_A3", "e0_eV", "B_GPa", "ok", "problem")})
    if fit["v0_A3"] is not None and fit["v0_A3"] > 0:
        s0 = (fit["v0_A3"] / v_in) ** (1.0 / 3.0)
        out["linear_scale0"] = float(s0)
        out["cell_lengths0_A"] = (np.linalg.norm(cell0, axis=1) * s0).tolist()
        out["v0_per_atom_A3"] = fit["v0_A3"] / len(atoms)
        out["a0_A"] = None if a_in is None else float(a_in * s0)
    else:
        out.update(linear_scale0=None, cell_lengths0_A=None, v0_per_atom_A3=None, a0_A=None)
    out["a_input_A"] = _f(a_in)
    return out


def _error_summary(errors: Sequence[float | None]) -> dict[str, Any]:
    e = np.array([x for x in errors if x is not None], dtype=np.float64)
    if e.size == 0:
        return {"mae": None, "max_abs": None, "mean": None, "n": 0}
    return {"mae": float(np.abs(e).mean()), "max_abs": float(np.abs(e).max()), "mean": float(e.mean()), "n": int(e.size)}


def _comparison(per: dict, **errors) -> dict[str, Any]:
    """Per-structure model-vs-oracle rows and the summary of each error list (None entries: a failed fit)."""
    return {"structures": per, "n_structures": len(per), "n_failed": sum(not r["ok"] for r in per.values()),
            "summary": {k: _error_summary(v) for k, v in errors.items()}}


def lattice_constant_errors(structures, model_calc: Calculator, oracle_calc: Calculator, **eos_kw) -> dict[str, Any]:
    """Model vs oracle EOS per structure: lattice constant (Å, %), volume (%), bulk modulus (GPa).

    ``structures``: a mapping name -> ``ase.Atoms`` or a sequence (named by index); ``eos_kw`` go to
    :func:`equation_of_state` for both calculators (``lattice_constant`` may be a mapping name -> Å, for
    supercells of different lattices). Errors are model minus oracle; a structure whose
    fit failed with either calculator has no errors and is counted in ``n_failed`` (the summary
    covers the others: MAE, max |error|, mean signed error).
    """
    items = list(structures.items()) if isinstance(structures, Mapping) else [(str(i), s) for i, s in enumerate(structures)]
    per, a_err, a_pct, v_pct, b_err = {}, [], [], [], []
    lattice = eos_kw.pop("lattice_constant", None)
    for name, atoms in items:
        kw = dict(eos_kw, lattice_constant=lattice.get(name) if isinstance(lattice, Mapping) else lattice)
        ref = equation_of_state(atoms, oracle_calc, **kw)
        mod = equation_of_state(atoms, model_calc, **kw)
        row: dict[str, Any] = {"oracle": ref, "model": mod, "ok": bool(ref["ok"] and mod["ok"])}
        if row["ok"]:
            if ref["a0_A"] is not None:
                row["a0_error_A"] = mod["a0_A"] - ref["a0_A"]
                row["a0_error_pct"] = 100.0 * row["a0_error_A"] / ref["a0_A"]
            else:
                row["a0_error_A"] = row["a0_error_pct"] = None
            row["v0_error_pct"] = 100.0 * (mod["v0_A3"] - ref["v0_A3"]) / ref["v0_A3"]
            row["B_error_GPa"] = mod["B_GPa"] - ref["B_GPa"]
        else:
            row.update(a0_error_A=None, a0_error_pct=None, v0_error_pct=None, B_error_GPa=None)
            row["problem"] = "; ".join(f"{who}: {r['problem']}" for who, r in (("oracle", ref), ("model", mod)) if not r["ok"])
        a_err.append(row["a0_error_A"])
        a_pct.append(row["a0_error_pct"])
        v_pct.append(row["v0_error_pct"])
        b_err.append(row["B_error_GPa"])
        per[name] = row
    return _comparison(per, a0_error_A=a_err, a0_error_pct=a_pct, v0_error_pct=v_pct, B_error_GPa=b_err)


# ---------------------------------------------------------------------------------------------
# NEB
# ---------------------------------------------------------------------------------------------
def neb_barrier(initial, final, calc_factory, n_images: int = 5, climb: bool = True, fmax: float = 0.05,
                steps: int = 300, path=None, optimizer: str = "BFGS", interpolation: str = "idpp",
                method: str = "improvedtangent", k: float = 0.1, mic: bool = False) -> dict[str, Any]:
    """Forward / reverse barrier (eV) of the minimum-energy path from ``initial`` to ``final`` by ASE's NEB.

    ``calc_factory``: a zero-argument callable returning a fresh calculator per image (e.g. ``EMT``),
    or one calculator instance, then shared by all images (``allow_shared_calculator``; use it for a
    ``JaxbenchCalculator`` so the jitted model compiles once). ``path``: a reference band (a list of
    ``ase.Atoms`` including both end points) to start from; then ``initial`` / ``final`` may be None
    and ``n_images`` is ``len(path) - 2``. Otherwise ``n_images`` interior images are interpolated
    (``interpolation``: ``"idpp"`` or ``"linear"``). End points are used as given (not relaxed) and
    keep their constraints; the images copy them. Inputs are not modified.
    """
    from ase.mep import NEB, NEBTools
    from ase.optimize import BFGS, FIRE

    if path is not None:
        path = list(path)
        if len(path) < 3:
            raise ValueError("a reference path needs both end points and at least one image")
        images = [a.copy() for a in path]
        if initial is not None and not np.allclose(initial.positions, images[0].positions):
            raise ValueError("`initial` differs from the first image of `path`")
        if final is not None and not np.allclose(final.positions, images[-1].positions):
            raise ValueError("`final` differs from the last image of `path`")
        start = "reference path"
    else:
        if n_images < 1:
            raise ValueError("n_images must be >= 1")
        images = [initial.copy()] + [initial.copy() for _ in range(n_images)] + [final.copy()]
        start = f"{interpolation} interpolation"
    shared = isinstance(calc_factory, Calculator)
    for im in images:
        im.calc = calc_factory if shared else calc_factory()
    neb = NEB(images, k=k, climb=climb, method=method, allow_shared_calculator=shared)
    if path is None:
        if interpolation == "idpp":
            neb.interpolate(method="idpp", mic=mic)
        elif interpolation == "linear":
            neb.interpolate(mic=mic)
        else:
            raise ValueError("interpolation must be 'idpp' or 'linear'")
    opt_cls = {"BFGS": BFGS, "FIRE": FIRE}[optimizer]
    problem = None
    try:
        with np.errstate(all="ignore"), opt_cls(neb, logfile=None) as opt:
            converged = bool(opt.run(fmax=fmax, steps=steps))
            n_steps = int(opt.get_number_of_steps())
    except (FloatingPointError, ValueError, np.linalg.LinAlgError) as err:  # a model blowing up
        converged, n_steps, problem = False, None, f"optimiser failed: {err}"
    energies = [float(im.get_potential_energy()) for im in images] if problem is None else []
    if problem is None and not np.all(np.isfinite(energies)):
        converged, problem = False, "non-finite energy on the band"
    out: dict[str, Any] = {
        "converged": converged,
        "n_steps": n_steps,
        "n_images": len(images) - 2,
        "climb": climb,
        "method": method,
        "optimizer": optimizer,
        "fmax_eV_per_A": fmax,
        "max_steps": steps,
        "start": start,
        "barrier_forward_eV": None,
        "barrier_reverse_eV": None,
        "barrier_max_image_eV": None,
        "delta_E_eV": None,
        "image_energies_eV": energies,
        "problem": problem if problem else (None if converged else f"band not converged to fmax {fmax} eV/Å in {steps} steps"),
    }
    if problem is None:
        tools = NEBTools(images)
        fwd, de = tools.get_barrier(fit=True)
        top, _ = tools.get_barrier(fit=False)
        band = {"barrier_forward_eV": float(fwd), "barrier_reverse_eV": float(fwd - de),
                "barrier_max_image_eV": float(top), "delta_E_eV": float(de)}
        if converged:
            out.update(band)
        else:
            out["unconverged_last_band"] = band  # not a result: the band is not a minimum-energy path
    return out


# ---------------------------------------------------------------------------------------------
# Size extensivity
# ---------------------------------------------------------------------------------------------
def _stack(x, tail: int) -> np.ndarray:
    """Frames of possibly different atom counts -> one [M, tail] array of their rows."""
    if isinstance(x, (list, tuple)):
        return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1, tail) for a in x], 0)
    return np.asarray(x, dtype=np.float64).reshape(-1, tail)


def _voigt(s) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    return full_to_voigt(s) if s.shape[-2:] == (3, 3) else s.reshape(-1, 6)


def prediction_errors(pred: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, Any]:
    """Per-atom energy MAE (meV/atom), force MAE (meV/Å), stress MAE (meV/Å^3) of one prediction set.

    ``pred`` / ``ref``: ``energy`` [F] (eV), ``forces`` [F, N, 3] or a list of [N_f, 3] (eV/Å),
    ``stress`` [F, 6] Voigt or [F, 3, 3] (eV/Å^3), optional; ``ref['n_atoms']`` [F] (or, if absent,
    taken from the reference forces).
    """
    out: dict[str, Any] = {"energy_mae_meV_per_atom": None, "force_mae_meV_per_A": None, "stress_mae_meV_per_A3": None}
    if ref.get("n_atoms") is not None:
        n = np.asarray(ref["n_atoms"], dtype=np.float64).reshape(-1)
    elif ref.get("forces") is not None:
        f = ref["forces"]
        n = np.array([len(a) for a in f] if isinstance(f, (list, tuple)) else [np.shape(f)[1]] * np.shape(f)[0], float)
    else:
        n = None
    if pred.get("energy") is not None and ref.get("energy") is not None:
        if n is None:
            raise ValueError("per-atom energy errors need ref['n_atoms'] or ref['forces']")
        de = np.asarray(pred["energy"], np.float64).reshape(-1) - np.asarray(ref["energy"], np.float64).reshape(-1)
        out["energy_mae_meV_per_atom"] = 1e3 * float(np.mean(np.abs(de) / n))
        out["n_frames"] = int(de.size)
    if pred.get("forces") is not None and ref.get("forces") is not None:
        df = _stack(pred["forces"], 3) - _stack(ref["forces"], 3)
        out["force_mae_meV_per_A"] = 1e3 * float(np.mean(np.abs(df)))
    if pred.get("stress") is not None and ref.get("stress") is not None:
        ds = _voigt(pred["stress"]) - _voigt(ref["stress"])
        out["stress_mae_meV_per_A3"] = 1e3 * float(np.mean(np.abs(ds)))
    return out


def size_extensivity(predictions: Mapping[tuple[str, str], Mapping[str, Any]],
                     references: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """MS25 Figure 4: E/F/S MAE for every (train size -> test size) pair.

    ``predictions[(train, test)]``: the model trained on ``train`` predicting the ``test`` set
    (``energy``, ``forces``, ``stress`` as in :func:`prediction_errors`); ``references[test]``: the
    labels of that set (with ``n_atoms``). Sizes are any labels, e.g. ``"small"`` and ``"big"``.
    Returns ``matrix["small->big"] = {...MAEs...}`` and, for each test set, the ratio of each
    transferred error to the error of the model trained on that size (``"small->big / big->big"``).
    """
    matrix = {}
    for (train, test), pred in predictions.items():
        if test not in references:
            raise ValueError(f"no reference labels for test set '{test}'")
        matrix[f"{train}->{test}"] = {"train": train, "test": test, **prediction_errors(pred, references[test])}
    ratios = extensivity_ratios(matrix, ("energy_mae_meV_per_atom", "force_mae_meV_per_A", "stress_mae_meV_per_A3"))
    return {"matrix": matrix, "ratios": ratios}


def extensivity_ratios(matrix: Mapping[str, Mapping[str, Any]], quantities: Sequence[str]) -> dict[str, Any]:
    """Each transferred error over the error of the model trained on the test size: for every
    ``"a->b"`` entry of ``matrix`` with ``a != b``, ``"a->b / b->b"`` -> {quantity: ratio or None}."""
    ratios = {}
    for key, row in matrix.items():
        train, test = key.split("->")
        own = matrix.get(f"{test}->{test}")
        if own is None or train == test:
            continue
        ratios[f"{key} / {test}->{test}"] = {
            q: (row[q] / own[q] if row.get(q) is not None and own.get(q) not in (None, 0.0) else None) for q in quantities
        }
    return ratios


# ---------------------------------------------------------------------------------------------
# Data training rate
# ---------------------------------------------------------------------------------------------
def loglog_slope(sizes, errors) -> dict[str, Any]:
    """Least-squares ``log10(err) = intercept + slope log10(N)`` with standard errors (None where n < 3)."""
    x = np.log10(np.asarray(sizes, dtype=np.float64))
    y = np.asarray([np.nan if e is None else e for e in errors], dtype=np.float64)
    keep = np.isfinite(y) & (y > 0) & np.isfinite(x)
    x, y = x[keep], np.log10(y[keep])
    n = int(x.size)
    out = {"slope": None, "slope_stderr": None, "intercept_log10": None, "intercept_stderr": None,
           "r2": None, "n_points": n}
    if n < 2 or np.ptp(x) == 0:
        return out
    xm = x.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * xm)
    resid = y - (intercept + slope * x)
    rss = float((resid**2).sum())
    syy = float(((y - y.mean()) ** 2).sum())
    out.update(slope=slope, intercept_log10=intercept, r2=(1.0 - rss / syy) if syy > 0 else 1.0)
    if n > 2:
        s2 = rss / (n - 2)
        out["slope_stderr"] = math.sqrt(s2 / sxx)
        out["intercept_stderr"] = math.sqrt(s2 * (1.0 / n + xm**2 / sxx))
    return out


def training_rate(sizes, errors) -> dict[str, Any]:
    """MS25 Table 8 "data training rate": log-log slope of error vs training-set size, per quantity.

    ``errors``: a mapping quantity -> errors at ``sizes`` (e.g. ``{"energy": [...], "forces": [...],
    "stress": [...]}``; None / NaN entries are dropped, e.g. no stress for molecules), or one
    sequence. Slopes are dimensionless (negative when the error falls with more data).
    """
    sizes = [float(s) for s in sizes]
    if isinstance(errors, Mapping):
        fits = {}
        for q, e in errors.items():
            if e is None:
                fits[q] = None
                continue
            if len(e) != len(sizes):
                raise ValueError(f"{q}: {len(e)} errors for {len(sizes)} training-set sizes")
            fits[q] = loglog_slope(sizes, e)
        return {"sizes": sizes, "fits": fits, "log": "log10"}
    if len(errors) != len(sizes):
        raise ValueError(f"{len(errors)} errors for {len(sizes)} training-set sizes")
    return {"sizes": sizes, "fit": loglog_slope(sizes, errors), "log": "log10"}


# ---------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------
def katoms_per_s(atom_steps_per_s: float) -> float:
    """MS25 Figure 7's unit: thousands of atom-steps per second."""
    return float(atom_steps_per_s) / 1000.0


def inference_speed(n_atoms: int, n_steps: int, seconds: float, n_replicas: int = 1) -> dict[str, float]:
    """Atom-steps/s and katoms/s of an MD run of ``n_replicas`` x ``n_atoms`` atoms for ``n_steps`` steps."""
    rate = n_atoms * n_steps * n_replicas / seconds
    return {"atom_steps_per_s": float(rate), "katoms_per_s": katoms_per_s(rate), "seconds": float(seconds),
            "n_atoms": int(n_atoms), "n_steps": int(n_steps), "n_replicas": int(n_replicas)}


# ---------------------------------------------------------------------------------------------
# Volume at temperature (NPT)
# ---------------------------------------------------------------------------------------------
NPT_VOLUME_RANGE = (1.0 / 3.0, 3.0)  # V / V_in outside this: the run is flagged as blown up (ASE route)


def _npt_checks(atoms, temperature_K, steps, equilibration_steps, sample_every, n_blocks, timestep_fs, where,
                blocks: bool = True):
    """ValueError for inputs no NPT run can use (before any compute); returns the number of samples."""
    if not np.all(atoms.pbc):
        raise ValueError(f"{where}: NPT needs a cell periodic in all three directions, got pbc={atoms.pbc.tolist()}")
    if not abs(np.linalg.det(np.array(atoms.cell))) > 0:
        raise ValueError(f"{where}: the cell has zero volume")
    if not (np.isfinite(temperature_K) and temperature_K > 0):
        raise ValueError(f"{where}: temperature_K must be > 0, got {temperature_K}")
    if not (np.isfinite(timestep_fs) and timestep_fs > 0):
        raise ValueError(f"{where}: timestep_fs must be > 0, got {timestep_fs}")
    if int(sample_every) != sample_every or sample_every < 1:
        raise ValueError(f"{where}: sample_every must be a positive integer, got {sample_every}")
    for key, value in (("steps", steps), ("equilibration_steps", equilibration_steps)):
        if int(value) != value or value < (1 if key == "steps" else 0) or value % sample_every:
            raise ValueError(f"{where}: {key} ({value}) must be a {'positive' if key == 'steps' else 'non-negative'} "
                             f"multiple of sample_every ({sample_every})")
    n = int(steps) // int(sample_every)
    if blocks and (int(n_blocks) < 2 or n < int(n_blocks)):
        raise ValueError(f"{where}: block averaging needs n_blocks >= 2 and at least n_blocks samples; got n_blocks="
                         f"{n_blocks}, {n} samples (steps {steps} / sample_every {sample_every})")
    return n


def block_stderr(x, n_blocks: int = 10) -> float:
    """Standard error of the mean of a correlated series from ``n_blocks`` contiguous block means.

    ``std(block means, ddof=1) / sqrt(n_blocks)``; the first ``len(x) % n_blocks`` samples are dropped
    so the blocks are equal. Blocks much longer than the correlation time give an unbiased estimate.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    b = x.size // int(n_blocks)
    if n_blocks < 2 or b < 1:
        raise ValueError(f"{x.size} samples cannot make {n_blocks} blocks (need n_blocks >= 2)")
    means = x[x.size - b * n_blocks:].reshape(n_blocks, b).mean(axis=1)
    return float(means.std(ddof=1) / math.sqrt(n_blocks))


def _npt_result(method: str, atoms, v_in: float, a_in, volume, pressure, temperature, se_v, se_p, stderr_method,
                n_samples: int, **extra) -> dict[str, Any]:
    """The shared result dict of both NPT routes (numbers None unless given)."""
    n = len(atoms)
    out: dict[str, Any] = {
        "method": method,
        "n_atoms": n,
        "v_input_A3": v_in,
        "a_input_A": _f(a_in),
        "volume_A3": _f(volume),
        "volume_per_atom_A3": None if volume is None else float(volume) / n,
        "volume_stderr_A3": _f(se_v),
        "volume_per_atom_stderr_A3": None if se_v is None else float(se_v) / n,
        "stderr_method": stderr_method,
        "pressure_bar": _f(pressure),
        "pressure_stderr_bar": _f(se_p),
        "temperature_K": _f(temperature),
        "linear_scale": None,
        "cell_lengths_A": None,
        "a_A": None,
        "a_stderr_A": None,
        "n_samples": int(n_samples),
    }
    if volume is not None and volume > 0:
        s = (float(volume) / v_in) ** (1.0 / 3.0)
        out["linear_scale"] = s
        out["cell_lengths_A"] = (np.linalg.norm(np.array(atoms.cell), axis=1) * s).tolist()
        if a_in is not None:
            out["a_A"] = float(a_in) * s
            out["a_stderr_A"] = None if se_v is None else out["a_A"] * float(se_v) / (3.0 * float(volume))
    out.update(extra)
    return out


def npt_volume_ase(atoms, calc: Calculator, temperature_K: float, pressure_bar: float = 1.01325,
                   timestep_fs: float = 2.0, steps: int = 20000, equilibration_steps: int = 5000,
                   tdamp_fs: float | None = None, pdamp_fs: float | None = None, seed: int = 0,
                   sample_every: int = 10, n_blocks: int = 10, tchain: int = 3, pchain: int = 3,
                   lattice_constant: float | None = None) -> dict[str, Any]:
    """Mean volume (Å^3) of ``atoms`` at ``temperature_K`` / ``pressure_bar`` by ASE's ``IsotropicMTKNPT`` with ``calc``.

    The oracle route of :func:`volume_at_temperature` (see the module docstring): ``calc`` must give
    forces and stress; ``tdamp_fs`` / ``pdamp_fs`` default to 100 / 1000 timesteps. One trajectory,
    so the volume's standard error is from ``n_blocks`` block means. ``atoms`` is not modified.
    A run whose energy, volume, pressure or temperature turns non-finite, that raises inside the
    calculator, or whose volume leaves ``NPT_VOLUME_RANGE`` times the input is flagged, not raised.
    """
    from ase.md.nose_hoover_chain import IsotropicMTKNPT
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    n_samples = _npt_checks(atoms, temperature_K, steps, equilibration_steps, sample_every, n_blocks, timestep_fs,
                            "npt_volume_ase")
    if atoms.constraints:
        raise ValueError("npt_volume_ase: ASE's IsotropicMTKNPT does not support constraints; remove them")
    tdamp_fs = 100.0 * timestep_fs if tdamp_fs is None else float(tdamp_fs)
    pdamp_fs = 1000.0 * timestep_fs if pdamp_fs is None else float(pdamp_fs)
    if not (tdamp_fs > 0 and pdamp_fs > 0):
        raise ValueError(f"npt_volume_ase: tdamp_fs and pdamp_fs must be > 0, got {tdamp_fs}, {pdamp_fs}")
    at = atoms.copy()
    at.calc = calc
    try:
        at.get_stress()
    except NotImplementedError as err:  # PropertyNotImplementedError is one
        raise ValueError(f"npt_volume_ase: the calculator gives no stress ({err}); NPT needs it") from None
    v_in = float(atoms.get_volume())
    a_in = lattice_constant if lattice_constant is not None else _cubic_edge(np.array(atoms.cell))
    thermalize_momenta(at, temperature_K, rng=np.random.default_rng(seed))
    Stationary(at, preserve_temperature=False)  # zero total momentum, as jax-md's initial momenta (not rescaled)
    dyn = IsotropicMTKNPT(at, timestep=timestep_fs * units.fs, temperature_K=temperature_K,
                          pressure_au=pressure_bar * units.bar, tdamp=tdamp_fs * units.fs, pdamp=pdamp_fs * units.fs,
                          tchain=tchain, pchain=pchain)
    settings = {
        "temperature_target_K": float(temperature_K), "pressure_target_bar": float(pressure_bar),
        "timestep_fs": float(timestep_fs), "steps": int(steps), "equilibration_steps": int(equilibration_steps),
        "sample_every": int(sample_every), "tdamp_fs": tdamp_fs, "pdamp_fs": pdamp_fs, "seed": int(seed),
        "n_replicas": 1,
    }
    lo, hi = NPT_VOLUME_RANGE
    vol, pres, temp = [], [], []
    problem = None
    done = 0
    try:
        with np.errstate(all="ignore"):
            for k in range(int(equilibration_steps) // int(sample_every) + n_samples):
                dyn.run(int(sample_every))
                done += int(sample_every)
                v = float(at.get_volume())
                e = float(at.get_potential_energy())
                p = -float(np.trace(at.get_stress(voigt=False, include_ideal_gas=True))) / 3.0 / units.bar
                t = float(at.get_temperature())
                if not all(np.isfinite(x) for x in (v, e, p, t)) or not np.all(np.isfinite(at.positions)):
                    problem = f"non-finite energy, volume, pressure or temperature at step {done}"
                    break
                if not lo < v / v_in < hi:
                    problem = f"volume {v:.4g} Å^3 at step {done} left [{lo:.3g}, {hi:.3g}] x the input volume"
                    break
                if done > equilibration_steps:
                    vol.append(v), pres.append(p), temp.append(t)
    except (FloatingPointError, ValueError, RuntimeError, MemoryError, np.linalg.LinAlgError) as err:
        problem = f"the run failed at step {done}: {type(err).__name__}: {err}"
    if problem is not None:
        return _npt_result("ase IsotropicMTKNPT", atoms, v_in, a_in, None, None, None, None, None, None, len(vol),
                           ok=False, problem=problem, n_blocks=None, **settings)
    vol, pres = np.array(vol), np.array(pres)
    b = n_samples // int(n_blocks)
    return _npt_result("ase IsotropicMTKNPT", atoms, v_in, a_in, vol.mean(), pres.mean(), float(np.mean(temp)),
                       block_stderr(vol, n_blocks), block_stderr(pres, n_blocks),
                       f"block averaging: {int(n_blocks)} blocks of {b} samples", n_samples,
                       ok=True, problem=None, n_blocks=int(n_blocks), **settings)


def _chunk_steps(total: int, every: int, target: int = 2000) -> int:
    """Steps per compiled chunk: the largest multiple of ``every`` up to ``target`` that divides ``total`` (one
    chunk shape), unless that is under a quarter of ``target`` (then a shorter last chunk, compiled once more)."""
    m, cap = total // every, max(1, target // every)
    best = max(d for d in range(1, min(m, cap) + 1) if m % d == 0)
    return (best if 4 * best >= min(m, cap) else min(m, cap)) * every


def npt_volume_jaxbench(model, atoms, temperature_K: float, pressure_bar: float = 1.01325, timestep_fs: float = 2.0,
                        steps: int = 20000, equilibration_steps: int = 5000, replicas: int = 4, seed: int = 0,
                        params=None, barostat_tau_fs: float | None = None, tau_fs: float | None = None,
                        sample_every: int = 10, n_blocks: int = 10, chain_length: int = 3,
                        max_compression: float = 0.15, lattice_constant: float | None = None,
                        cutoff: float | None = None, devices: int | None = None) -> dict[str, Any]:
    """Mean volume (Å^3) of ``atoms`` at ``temperature_K`` and ``pressure_bar`` by ``jaxbench.md.simulate`` (NPT).

    The model route of :func:`volume_at_temperature`, with the keys of :func:`npt_volume_ase`.
    ``model``: anything :func:`jaxbench.md.simulate` takes (an ``EnergyModel`` such as
    ``md.lennard_jones(...)``, a ``Potential`` with ``params``, a graph function with ``cutoff``).
    ``replicas`` independent trajectories (replica r's velocities from ``fold_in(PRNGKey(seed), r)``)
    run as one compiled batch; the standard error is that of the replicas' means (``replicas >= 2``)
    or from ``n_blocks`` block means of the one trajectory. ``tau_fs`` / ``barostat_tau_fs`` default
    to 100 / 1000 timesteps. A replica stopped by a failure criterion (non-finite, temperature, or
    compressed beyond ``max_compression``, which the neighbour list covers) flags the result.
    ``n_samples`` counts the samples of all replicas. JAX must run in float64
    (``jax.config.update("jax_enable_x64", True)``).
    """
    from . import md
    from .md.failures import describe_failure

    if int(replicas) != replicas or replicas < 1:
        raise ValueError(f"npt_volume_jaxbench: replicas must be a positive integer, got {replicas}")
    n_samples = _npt_checks(atoms, temperature_K, steps, equilibration_steps, sample_every, n_blocks, timestep_fs,
                            "npt_volume_jaxbench", blocks=replicas < 2)  # replicas >= 2: their means give the error
    R, every = int(replicas), int(sample_every)
    total = int(equilibration_steps) + int(steps)
    protocol = md.Protocol(ensemble="npt_nose_hoover", temperature_K=float(temperature_K),
                           timestep_fs=float(timestep_fs), steps=total, replicas=R, save_every=every, chunk_steps=_chunk_steps(total, every),
                           pressure_bar=float(pressure_bar), barostat_tau_fs=barostat_tau_fs, tau_fs=tau_fs,
                           chain_length=int(chain_length), max_compression=float(max_compression),
                           name="npt_volume")
    protocol.validate()  # a protocol error (e.g. a timestep above the engine's limit) before anything compiles
    pos = np.array(atoms.positions, dtype=np.float64)
    start = md.Start.make(np.stack([pos] * R), atoms.numbers, np.array(atoms.cell, dtype=np.float64), atoms.pbc)
    v_in = float(atoms.get_volume())
    a_in = lattice_constant if lattice_constant is not None else _cubic_edge(np.array(atoms.cell))
    settings = {
        "temperature_target_K": float(temperature_K), "pressure_target_bar": float(pressure_bar),
        "timestep_fs": float(timestep_fs), "steps": int(steps), "equilibration_steps": int(equilibration_steps),
        "sample_every": every, "tau_fs": 100.0 * timestep_fs if tau_fs is None else float(tau_fs),
        "barostat_tau_fs": 1000.0 * timestep_fs if barostat_tau_fs is None else float(barostat_tau_fs),
        "seed": int(seed), "n_replicas": R,
    }
    method = "jaxbench md npt_nose_hoover (jax-md isotropic MTK)"
    res = md.simulate(model, start, protocol, params=params, seed=seed, progress=False, cutoff=cutoff,
                      devices=devices, keep_arrays=True)
    arr = res.arrays
    sampled = np.asarray(arr["step"]) > int(equilibration_steps)
    vol = np.asarray(arr["volume"])[:, sampled]
    pres = np.asarray(arr["pressure"])[:, sampled]
    temp = np.asarray(arr["temperature"])[:, sampled]
    failed = [int(r) for r in np.nonzero(res.failed)[0]]
    problem = None
    if failed:
        problem = "; ".join(f"replica {r} failed at step {int(res.failure_step[r])}: "
                            f"{describe_failure(res.failure_reason[r])}" for r in failed)
    elif not (np.all(np.isfinite(vol)) and np.all(np.isfinite(pres)) and np.all(np.isfinite(temp))):
        problem = "non-finite volume, pressure or temperature in the sampled frames"
    elif vol.shape[1] != n_samples:  # the bookkeeping of steps / sample_every, checked
        problem = f"{vol.shape[1]} sampled frames per replica, expected {n_samples}"
    extra = {"failed_replicas": failed, **settings}
    if problem is not None:
        return _npt_result(method, atoms, v_in, a_in, None, None, None, None, None, None, vol.size, ok=False,
                           problem=problem, n_blocks=None, replica_volumes_A3=None, **extra)
    v_r, p_r = vol.mean(axis=1), pres.mean(axis=1)
    if R >= 2:
        se_v, se_p = (float(x.std(ddof=1) / math.sqrt(R)) for x in (v_r, p_r))
        how, nb = f"replica means: {R} independent replicas", None
    else:
        se_v, se_p = block_stderr(vol[0], n_blocks), block_stderr(pres[0], n_blocks)
        how, nb = f"block averaging: {int(n_blocks)} blocks of {n_samples // int(n_blocks)} samples", int(n_blocks)
    return _npt_result(method, atoms, v_in, a_in, vol.mean(), pres.mean(), temp.mean(), se_v, se_p, how, vol.size,
                       ok=True, problem=None, n_blocks=nb, replica_volumes_A3=v_r.tolist(), **extra)


def volume_errors(pairs: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, Any]:
    """Model vs oracle NPT volumes per structure and their summary; pure arithmetic on result dicts.

    ``pairs[name] = (oracle, model)``, each a result of :func:`npt_volume_ase` /
    :func:`npt_volume_jaxbench` (only ``ok``, ``problem``, ``volume_A3``, ``volume_stderr_A3`` and
    ``a_A`` are read). Errors are model minus oracle: volume in % of the oracle's (with its standard
    error ``100 sqrt(se_m^2 + se_o^2) / V_o`` and ``volume_error_z``, the difference in those
    standard errors), lattice constant in Å and %. A structure where either run failed has no
    errors and counts in ``n_failed``.
    """
    per, v_pct, a_err, a_pct = {}, [], [], []
    for name, (ref, mod) in pairs.items():
        row: dict[str, Any] = {"oracle": ref, "model": mod, "ok": bool(ref["ok"] and mod["ok"]),
                               "volume_error_pct": None, "volume_error_stderr_pct": None, "volume_error_z": None,
                               "a_error_A": None, "a_error_pct": None}
        if row["ok"]:
            vo, vm = float(ref["volume_A3"]), float(mod["volume_A3"])
            row["volume_error_pct"] = 100.0 * (vm - vo) / vo
            ses = [ref.get("volume_stderr_A3"), mod.get("volume_stderr_A3")]
            if all(s is not None for s in ses):
                se = math.hypot(*ses)
                row["volume_error_stderr_pct"] = 100.0 * se / vo
                row["volume_error_z"] = (vm - vo) / se if se > 0 else None
            if ref.get("a_A") is not None and mod.get("a_A") is not None:
                row["a_error_A"] = float(mod["a_A"]) - float(ref["a_A"])
                row["a_error_pct"] = 100.0 * row["a_error_A"] / float(ref["a_A"])
        else:
            row["problem"] = "; ".join(f"{who}: {r.get('problem')}" for who, r in (("oracle", ref), ("model", mod))
                                       if not r["ok"])
        v_pct.append(row["volume_error_pct"])
        a_err.append(row["a_error_A"])
        a_pct.append(row["a_error_pct"])
        per[name] = row
    return _comparison(per, volume_error_pct=v_pct, a_error_A=a_err, a_error_pct=a_pct)


_NPT_COMMON = ("pressure_bar", "timestep_fs", "steps", "equilibration_steps", "seed", "sample_every", "n_blocks",
               "lattice_constant")


def volume_at_temperature(structures, model, oracle_calc: Calculator, temperature_K: float, params=None,
                          oracle_kw: Mapping[str, Any] | None = None, model_kw: Mapping[str, Any] | None = None,
                          **kw) -> dict[str, Any]:
    """MS25's volume error at temperature: per structure the oracle's NPT volume (:func:`npt_volume_ase`
    with ``oracle_calc``) and the model's (:func:`npt_volume_jaxbench` with ``model`` / ``params``).

    ``structures``: a mapping name -> ``ase.Atoms`` or a sequence (named by index). ``kw`` go to both
    routes (``pressure_bar``, ``timestep_fs``, ``steps``, ``equilibration_steps``, ``seed``,
    ``sample_every``, ``n_blocks``, ``lattice_constant``: Å, or a mapping name -> Å for supercells of
    different lattices); ``tau_fs`` / ``barostat_tau_fs`` set the
    coupling times of both (ASE's ``tdamp_fs`` / ``pdamp_fs``); ``replicas`` goes to the model route;
    ``oracle_kw`` / ``model_kw`` to one route only. Returns :func:`volume_errors` of the runs: per
    structure both results and the errors, a summary (MAE, max |error|, mean signed error) of the
    volume error (%) and lattice-constant error (Å, %), and ``n_failed``.
    """
    unknown = sorted(set(kw) - set(_NPT_COMMON) - {"tau_fs", "barostat_tau_fs", "replicas"})
    if unknown:
        raise ValueError(f"volume_at_temperature: unknown keyword(s) {unknown}; "
                         "use oracle_kw= / model_kw= for one route")
    common = {k: kw[k] for k in _NPT_COMMON if k in kw}
    lattice = common.pop("lattice_constant", None)
    ase_names = {"tau_fs": "tdamp_fs", "barostat_tau_fs": "pdamp_fs"}
    ase_kw = {**common, **{ase_names[k]: kw[k] for k in ase_names if k in kw}, **(oracle_kw or {})}
    jax_kw = {**common, **{k: kw[k] for k in ("tau_fs", "barostat_tau_fs", "replicas") if k in kw}, **(model_kw or {})}
    items = (list(structures.items()) if isinstance(structures, Mapping)
             else [(str(i), s) for i, s in enumerate(structures)])
    pairs = {}
    for name, atoms in items:
        a = lattice.get(name) if isinstance(lattice, Mapping) else lattice
        ref = npt_volume_ase(atoms, oracle_calc, temperature_K, **{"lattice_constant": a, **ase_kw})
        mod = npt_volume_jaxbench(model, atoms, temperature_K, params=params, **{"lattice_constant": a, **jax_kw})
        pairs[name] = (ref, mod)
    return volume_errors(pairs)
