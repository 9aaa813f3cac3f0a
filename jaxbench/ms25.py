"""The MS25 protocol (Maxson et al.): materials observables of a model against an exact, cheap oracle.

MS25's own data are not public; its HEA set was labelled by a classical potential, so this runs the same
measurements on data ASE's EMT labels (``jaxbench data generate hea-emt / surface-emt / bulk-emt-2 /
bulk-emt-4``), with EMT as the oracle of every observable. ``run_ms25(model, out)`` (CLI: ``jaxbench bench
--task ms25 --model CARD``) runs the parts below; each writes its section of ``out/ms25.json`` when it is
done, and a re-run keeps every finished section whose inputs are unchanged (training runs resume or are
reused as in ``jaxbench bench``):

``hea``          train on ``hea-emt``; test E/F/S errors; equation of state (``ase.eos``, Murnaghan, +-10 %
                 volume, positions not relaxed: the random alloys are scanned at their ideal fcc sites, the
                 same for model and EMT) of ``compositions`` random equimolar alloys (2-5 of EMT's metals,
                 32-atom conventional supercells at the Vegard lattice constant): lattice-constant errors
                 in Å and %, bulk modulus in GPa (MS25 Fig. 5a-b); MD speed in katoms/s (Fig. 7).
``volume``       the ``hea`` model's mean NPT volume at ``volume_temperature_K`` (300 K) and 1 bar of the first
                 ``volume_structures`` (3) alloys against EMT's (ASE's isotropic MTK NPT): MS25's volume error at
                 temperature (its zeolite volumes), in % with its standard error.
``surface``      train on ``surface-emt``; forward / reverse barrier of the adatom hop by ASE's climbing-image
                 NEB through the model, started from EMT's path as MS25 started from DFT's (Fig. 5c).
``extensivity``  train on ``bulk-emt-2`` (32 atoms) and on ``bulk-emt-4`` (256 atoms); each model's E/F/S
                 errors on both test sets (MS25 Fig. 4).
``rate``         train on the first N frames of ``rate_dataset`` for every N of ``rate_sizes``; the log-log
                 slope of the test E, F (and S) errors with its standard error (MS25 Table 8).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import runs

PARTS = ("hea", "volume", "surface", "extensivity", "rate")
DEFAULT_FRAMES = {"hea-emt": 300, "surface-emt": 200, "bulk-emt-2": 200, "bulk-emt-4": 200}
DEFAULT_RATE_SIZES = (50, 100, 200, 400, 800)


def generated_dataset(generator: str, frames: int, seed: int, data_dir=None, log=None) -> str:
    """The name of the generated dataset (generated now if its card is not in the data directory)."""
    from . import generate
    from .data import resolve_data_dir

    name = generate.dataset_name(generator, frames, seed)
    if not generate.card_path(resolve_data_dir(data_dir), name).is_file():
        generate.generate(generator, frames=frames, seed=seed, data_dir=data_dir, log=log)
    return name


def random_alloys(n: int, seed: int = 0, repeat: int = 2, elements: Sequence[str] | None = None):
    """``n`` random equimolar fcc alloys of 2-5 of EMT's metals, ``repeat``^3 conventional cells at the Vegard
    lattice constant: ``{name: (atoms, lattice_constant_A)}``, names like ``"03-CuNiPt"``."""
    from ase.build import bulk

    from .generate.emt import EMT_METALS, alloy_lattice

    elements = tuple(elements or EMT_METALS)
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        k = int(rng.integers(2, min(5, len(elements)) + 1))
        els = [elements[j] for j in sorted(rng.choice(len(elements), size=k, replace=False))]
        a0 = alloy_lattice(els)
        atoms = bulk("Cu", "fcc", a=a0, cubic=True).repeat(repeat)
        sym = [els[m % k] for m in range(len(atoms))]
        rng.shuffle(sym)
        atoms.set_chemical_symbols(sym)
        out[f"{i:02d}-{''.join(els)}"] = (atoms, a0)
    return out


class _Sections:
    """out/ms25.json, rewritten atomically after every part; a part is kept when its key is unchanged."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except Exception:  # noqa: BLE001 - none yet, or unreadable: nothing is reused
            self.data = {}
        self.data.setdefault("parts", {})

    def done(self, part: str, key: dict) -> dict | None:
        sec = self.data["parts"].get(part)
        return sec if isinstance(sec, dict) and sec.get("key") == key and "result" in sec else None

    def put(self, part: str, key: dict, result: dict, seconds: float):
        self.data["parts"][part] = {"key": key, "result": result, "seconds": seconds, "finished": time.time()}
        runs.write_json(self.path, self.data)


def _train(model, dataset: str, run_dir: Path, train_kw: dict):
    from .stages import train_stage, training_finished

    return train_stage(model, dataset, run_dir, reuse=training_finished(run_dir), train_kw=train_kw)


def _accuracy(run_dir: Path, dataset: str, data_dir, n_test=None) -> dict:
    from .stages import evaluate_stage

    return evaluate_stage(run_dir, dataset, n_test=n_test, plots=False, data_dir=data_dir).section()


def _calculator(run_dir: Path):
    from .calculator import JaxbenchCalculator

    pot, params = runs.load_potential(run_dir, "best")
    return JaxbenchCalculator(pot, params), pot, params


def md_speed(run_dir: Path, atoms, steps: int = 200, timestep_fs: float = 2.0, temperature_K: float = 300.0) -> dict:
    """katoms/s of the run's model in a compiled NVT rollout of ``atoms`` (one replica, compile excluded)."""
    from . import md
    from .materials import inference_speed

    pot, params = runs.load_potential(run_dir, "best")
    chunk = max(10, steps // 4)
    steps = chunk * 4
    p = md.Protocol(ensemble="nvt_langevin", temperature_K=temperature_K, timestep_fs=timestep_fs, steps=steps,
                    replicas=1, save_every=10, chunk_steps=chunk, friction_per_fs=0.01)
    start = md.Start.make(atoms.positions[None], atoms.numbers, np.asarray(atoms.cell), atoms.pbc)
    res = md.simulate(pot, start, p, params=params, seed=0, progress=False)
    timed = steps - chunk  # the first chunk compiles
    return dict(inference_speed(len(atoms), timed, res.timings["chunks_s"]), n_atoms=len(atoms), steps_timed=timed,
                system=atoms.get_chemical_formula())


def _part_hea(model, out, train_kw, data_dir, frames, seed, compositions, log):
    from ase.calculators.emt import EMT

    from .materials import lattice_constant_errors

    ds = generated_dataset("hea-emt", frames["hea-emt"], seed, data_dir, log)
    tr = _train(model, ds, out / "train-hea", train_kw)
    calc, pot, params = _calculator(tr.run_dir)
    alloys = random_alloys(compositions, seed)
    lattice = lattice_constant_errors({k: a for k, (a, _) in alloys.items()}, calc, EMT(),
                                      lattice_constant={k: a0 for k, (_, a0) in alloys.items()})
    for row in lattice["structures"].values():  # keep the JSON small: the scans' points stay out of it
        for side in ("model", "oracle"):
            for k in ("volumes_A3", "energies_eV"):
                row[side].pop(k, None)
    speed_atoms = next(iter(alloys.values()))[0].repeat(2)
    return {"dataset": ds, "training": tr.section, "accuracy": _accuracy(tr.run_dir, ds, data_dir),
            "eos": dict(lattice, scan="+-10 % volume, 11 points, Murnaghan (ase.eos); positions not relaxed",
                        compositions=len(alloys)),
            "speed": md_speed(tr.run_dir, speed_atoms)}


def _part_volume(model, out, train_kw, data_dir, frames, seed, n_structures, temperature_K, steps, log):
    from ase.calculators.emt import EMT

    from .materials import volume_at_temperature

    ds = generated_dataset("hea-emt", frames["hea-emt"], seed, data_dir, log)
    tr = _train(model, ds, out / "train-hea", train_kw)  # the hea part's run (reused)
    pot, params = runs.load_potential(tr.run_dir, "best")
    alloys = dict(list(random_alloys(max(n_structures, 1), seed).items())[:n_structures])
    res = volume_at_temperature({k: a for k, (a, _) in alloys.items()}, pot, EMT(), temperature_K, params=params,
                                lattice_constant={k: a0 for k, (_, a0) in alloys.items()}, timestep_fs=2.0,
                                steps=steps, equilibration_steps=steps // 3, replicas=4, seed=seed)
    return dict(res, temperature_K=temperature_K, pressure_bar=1.01325, steps_sampled=steps, dataset=ds,
                method="model: jaxbench NPT (jax-md MTK), 4 replicas; EMT: ASE IsotropicMTKNPT, one run, block errors")


def _part_surface(model, out, train_kw, data_dir, frames, seed, log, neb_steps: int = 300):
    from ase.calculators.emt import EMT

    from .generate.emt import adatom_hop
    from .materials import neb_barrier

    ds = generated_dataset("surface-emt", frames["surface-emt"], seed, data_dir, log)
    tr = _train(model, ds, out / "train-surface", train_kw)
    calc, _, _ = _calculator(tr.run_dir)
    initial, final, path = adatom_hop()
    oracle = neb_barrier(None, None, EMT, path=path, steps=neb_steps)
    with_model = neb_barrier(None, None, calc, path=path, steps=neb_steps)
    err = None
    if oracle.get("converged") and with_model.get("converged"):
        err = {k: with_model[k] - oracle[k] for k in ("barrier_forward_eV", "barrier_reverse_eV")}
    return {"dataset": ds, "training": tr.section, "accuracy": _accuracy(tr.run_dir, ds, data_dir),
            "neb": {"oracle": oracle, "model": with_model, "error_eV": err,
                    "start": "EMT's climbing-image path (7 images), as MS25 started from the DFT path"}}


def _part_extensivity(model, out, train_kw, data_dir, frames, seed, log):
    from .materials import extensivity_ratios

    sets = {"small": generated_dataset("bulk-emt-2", frames["bulk-emt-2"], seed, data_dir, log),
            "big": generated_dataset("bulk-emt-4", frames["bulk-emt-4"], seed, data_dir, log)}
    trainings, matrix = {}, {}
    for size, ds in sets.items():
        trainings[size] = _train(model, ds, out / f"train-{size}", train_kw)
    for a, tr in trainings.items():
        for b, ds in sets.items():
            m = _accuracy(tr.run_dir, ds, data_dir)
            matrix[f"{a}->{b}"] = {k: m.get(k) for k in ("energy_mae_meV_atom", "forces_mae_meV_A", "stress_mae_meV_A3")}
    ratios = extensivity_ratios(matrix, ("energy_mae_meV_atom", "forces_mae_meV_A", "stress_mae_meV_A3"))
    return {"datasets": sets, "training": {k: t.section for k, t in trainings.items()}, "matrix": matrix,
            "ratio_to_same_size": ratios}


def _part_rate(model, out, train_kw, data_dir, dataset, sizes, n_test, log):
    from .materials import training_rate

    errors = {"energy_mae_meV_atom": [], "forces_mae_meV_A": [], "stress_mae_meV_A3": []}
    per_size = {}
    for n in sizes:
        tr = _train(model, dataset, out / f"train-rate-n{n}", dict(train_kw, n_train=int(n)))
        acc = _accuracy(tr.run_dir, dataset, data_dir, n_test=n_test)
        per_size[str(n)] = {"training": tr.section, "accuracy": acc}
        for k in errors:
            errors[k].append(acc.get(k))
    # a quantity the dataset does not label (stress of molecules) has no fit
    fits = training_rate(list(sizes), {k: (v if all(e is not None and e > 0 for e in v) else None)
                                       for k, v in errors.items()})["fits"]
    return {"dataset": dataset, "sizes": list(sizes), "per_size": per_size, "fits": fits}


def run_ms25(model, out, *, budget="5m", max_epochs: int | None = None, parts: Sequence[str] = PARTS,
             compositions: int = 50, rate_dataset: str = "md17-ethanol", rate_sizes: Sequence[int] = DEFAULT_RATE_SIZES,
             rate_n_test: int | None = 500, volume_structures: int = 3, volume_temperature_K: float = 300.0,
             volume_steps: int = 3000, frames: dict | None = None, seed: int = 0, n_val: int | None = None,
             data_dir=None, progress: bool = True) -> dict[str, Any]:
    """Run the MS25 parts (see the module docstring) for ``model`` into ``out``; returns ms25.json's content.

    ``budget`` / ``max_epochs`` bound every training run (one per part, two for extensivity, one per size
    for the rate). ``frames``: generated frame counts by generator (``DEFAULT_FRAMES``)."""
    from .errors import JaxbenchError
    from .locks import locked
    from .potential import model_card

    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise JaxbenchError(f"ms25: unknown part(s) {unknown} (use {', '.join(PARTS)})")
    out = Path(out)
    frames = {**DEFAULT_FRAMES, **(frames or {})}
    card = model_card(model) if isinstance(model, str) else dict(model)
    card.pop("_path", None)
    card_sha = hashlib.sha256(json.dumps(card, sort_keys=True, default=str).encode()).hexdigest()[:16]
    train_kw = dict(budget=budget, max_epochs=max_epochs, seed=seed, n_val=n_val, progress=progress, data_dir=data_dir)
    log = print if progress else None
    with locked(out, "MS25 benchmark directory"):
        sec = _Sections(out / "ms25.json")
        sec.data.update(jaxbench_ms25=1, model=card["name"], budget=budget, max_epochs=max_epochs, seed=seed,
                        oracle="ASE EMT", started=sec.data.get("started", time.time()))
        common = dict(card=card_sha, budget=budget, max_epochs=max_epochs, seed=seed, n_val=n_val)
        jobs = {
            "hea": (dict(common, frames=frames["hea-emt"], compositions=compositions),
                    lambda: _part_hea(card, out, train_kw, data_dir, frames, seed, compositions, log)),
            "volume": (dict(common, frames=frames["hea-emt"], structures=volume_structures, T=volume_temperature_K,
                            steps=volume_steps),
                       lambda: _part_volume(card, out, train_kw, data_dir, frames, seed, volume_structures,
                                            volume_temperature_K, volume_steps, log)),
            "surface": (dict(common, frames=frames["surface-emt"]),
                        lambda: _part_surface(card, out, train_kw, data_dir, frames, seed, log)),
            "extensivity": (dict(common, frames=[frames["bulk-emt-2"], frames["bulk-emt-4"]]),
                            lambda: _part_extensivity(card, out, train_kw, data_dir, frames, seed, log)),
            "rate": (dict(common, dataset=rate_dataset, sizes=list(rate_sizes), n_test=rate_n_test),
                     lambda: _part_rate(card, out, train_kw, data_dir, rate_dataset, rate_sizes, rate_n_test, log)),
        }
        for part in parts:
            key, job = jobs[part]
            if sec.done(part, key) is not None:
                continue
            t0 = time.perf_counter()
            sec.put(part, key, job(), time.perf_counter() - t0)
        return sec.data


# --------------------------------------------------------------------------------------------------
# tables (``jaxbench report DIR ... --paper ms25``)
# --------------------------------------------------------------------------------------------------
def load(path) -> dict[str, Any]:
    """An MS25 directory's ms25.json (``path``: the file or its directory)."""
    from .errors import JaxbenchError

    p = Path(path)
    p = p / "ms25.json" if p.is_dir() else p
    if not p.is_file():
        raise JaxbenchError(f"no MS25 results at {p} (run `jaxbench bench --task ms25` first)")
    return json.loads(p.read_text())


def _fmt(x, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _result(r: dict, part: str) -> dict | None:
    sec = (r.get("parts") or {}).get(part)
    return sec.get("result") if isinstance(sec, dict) else None


def ms25_tables(results: list[dict]) -> dict[str, dict[str, Any]]:
    """MS25's measurements over ms25.json contents, with the paper's Table 8 (HEA rows) as context."""
    from .tables import published

    rate_rows, ext_rows, obs_rows, speed_rows, acc_rows = [], [], [], [], []
    for r in results:
        m = r.get("model")
        rate = _result(r, "rate")
        if rate:
            cells = []
            for k in ("energy_mae_meV_atom", "forces_mae_meV_A", "stress_mae_meV_A3"):
                f = (rate.get("fits") or {}).get(k)
                # MS25 prints the rate as a positive number: minus the log-log slope
                cells.append("-" if not f else f"{-f['slope']:.3f} ± {f['slope_stderr']:.3f}")
            rate_rows.append([m, rate["dataset"], ",".join(str(s) for s in rate["sizes"])] + cells)
        ext = _result(r, "extensivity")
        if ext:
            for pair, v in ext["matrix"].items():
                ext_rows.append([m, pair, _fmt(v.get("energy_mae_meV_atom"), 2), _fmt(v.get("forces_mae_meV_A"), 1),
                                 _fmt(v.get("stress_mae_meV_A3"), 2)])
        hea, surf = _result(r, "hea"), _result(r, "surface")
        if hea or surf or _result(r, "volume"):
            row = [m]
            if hea:
                s = hea["eos"]["summary"]
                row += [_fmt(s["a0_error_A"]["mae"], 4), _fmt(s["a0_error_pct"]["mae"], 2), _fmt(s["B_error_GPa"]["mae"], 1),
                        f"{hea['eos']['n_structures'] - hea['eos']['n_failed']}/{hea['eos']['n_structures']}"]
            else:
                row += ["-"] * 4
            vol = _result(r, "volume")
            if vol:
                sv = vol["summary"]["volume_error_pct"]
                row += [_fmt(sv["mae"], 2), f"{vol['n_structures'] - vol['n_failed']}/{vol['n_structures']}"]
            else:
                row += ["-", "-"]
            if surf:
                neb = surf["neb"]
                fwd = lambda d: d.get("barrier_forward_eV") if d.get("converged") else None  # noqa: E731
                row += [_fmt(fwd(neb["model"])), _fmt(fwd(neb["oracle"])),
                        _fmt((neb.get("error_eV") or {}).get("barrier_forward_eV"))
                        if neb.get("error_eV") else ("not converged" if fwd(neb["oracle"]) is not None else "-")]
            else:
                row += ["-"] * 3
            obs_rows.append(row)
        for part in ("hea", "surface"):
            sec = _result(r, part)
            if sec:
                a = sec["accuracy"]
                acc_rows.append([m, sec["dataset"], _fmt(a.get("energy_mae_meV_atom"), 2), _fmt(a.get("forces_mae_meV_A"), 1),
                                 _fmt(a.get("stress_mae_meV_A3"), 2)])
        if hea and hea.get("speed"):
            sp = hea["speed"]
            speed_rows.append([m, sp["system"], sp["n_atoms"], _fmt(sp["katoms_per_s"], 2)])
    paper = published().get("ms25", {}).get("table8", {}).get("rows", [])
    for row in paper:
        if row.get("dataset") == "HEA":
            rate_rows.append([f"MS25: {row['model']}", "HEA (MS25's data)", "50-1000", _fmt(row.get("E")), _fmt(row.get("F")),
                              _fmt(row.get("S"))])
    return {
        "ms25_table8": {"title": "Data training rate: minus the log-log slope of test MAE vs training frames (MS25 Table 8; "
                                 "± standard error of the fit; MS25's HEA rows below, on its own data)",
                        "header": ["model", "dataset", "N", "E", "F", "S"], "rows": rate_rows},
        "ms25_extensivity": {"title": "Size extensivity: train -> test on bulk-emt-2 (32 atoms, small) / bulk-emt-4 (256, big) "
                                      "(MS25 Fig. 4)",
                             "header": ["model", "train->test", "E MAE meV/atom", "F MAE meV/Å", "S MAE meV/Å³"],
                             "rows": ext_rows},
        "ms25_observables": {"title": "Observables against EMT: HEA lattice constant / bulk modulus (Murnaghan EOS), NPT volume at "
                                      "300 K, adatom hop barrier (CI-NEB) (MS25 Fig. 5)",
                             "header": ["model", "a0 MAE Å", "a0 MAE %", "B MAE GPa", "EOS fits ok",
                                        "V(T) MAE %", "V(T) ok", "barrier model eV", "barrier EMT eV", "error eV"],
                             "rows": obs_rows},
        "ms25_accuracy": {"title": "Test errors on the generated EMT sets",
                          "header": ["model", "dataset", "E MAE meV/atom", "F MAE meV/Å", "S MAE meV/Å³"], "rows": acc_rows},
        "ms25_speed": {"title": "MD speed (MS25 Fig. 7; one replica, NVT, compile excluded)",
                       "header": ["model", "system", "atoms", "katoms/s"], "rows": speed_rows},
    }

