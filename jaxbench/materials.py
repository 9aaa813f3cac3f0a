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


def lattice_constant_errors(structures, model_calc: Calculator, oracle_calc: Calculator, **eos_kw) -> dict[str, Any]:
    """Model vs oracle EOS per structure: lattice constant (Å, %), volume (%), bulk modulus (GPa).

    ``structures``: a mapping name -> ``ase.Atoms`` or a sequence (named by index); ``eos_kw`` go to
    :func:`equation_of_state` for both calculators. Errors are model minus oracle; a structure whose
    fit failed with either calculator has no errors and is counted in ``n_failed`` (the summary
    covers the others: MAE, max |error|, mean signed error).
    """
    items = list(structures.items()) if isinstance(structures, Mapping) else [(str(i), s) for i, s in enumerate(structures)]
    per, a_err, a_pct, v_pct, b_err = {}, [], [], [], []
    for name, atoms in items:
        ref = equation_of_state(atoms, oracle_calc, **eos_kw)
        mod = equation_of_state(atoms, model_calc, **eos_kw)
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
    return {
        "structures": per,
        "n_structures": len(items),
        "n_failed": sum(not r["ok"] for r in per.values()),
        "summary": {
            "a0_error_A": _error_summary(a_err),
            "a0_error_pct": _error_summary(a_pct),
            "v0_error_pct": _error_summary(v_pct),
            "B_error_GPa": _error_summary(b_err),
        },
    }


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
    ratios = {}
    for key, row in matrix.items():
        own = matrix.get(f"{row['test']}->{row['test']}")
        if own is None or row["train"] == row["test"]:
            continue
        ratios[f"{key} / {row['test']}->{row['test']}"] = {
            q: (row[q] / own[q] if row[q] is not None and own[q] not in (None, 0.0) else None)
            for q in ("energy_mae_meV_per_atom", "force_mae_meV_per_A", "stress_mae_meV_per_A3")
        }
    return {"matrix": matrix, "ratios": ratios}


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
