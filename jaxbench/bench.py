"""The end-to-end benchmark: train (or reuse) a model, evaluate it, simulate it, score the simulation.

    bench(model, dataset, out) -> results      (`jaxbench bench --model CARD --dataset NAME`)

One directory per benchmark::

    out/
      train/                 the training run (jaxbench.runs layout), unless an existing run is given
      trajectory.h5          the model's rollout (H5MD, all replicas)
      reference.h5           the oracle's rollout from the same initial state (when an oracle is given)
      results.json           every number with its unit, written after every stage
      report.md              the same as a readable page, with the plots
      *.png                  RDF / h(r) overlays, EV and FV against time, MSD, temperature and energy traces

A number is reported only where it can be computed honestly: otherwise the entry is
``{"value": null, "not_applicable": "<reason>"}``. Failed replicas are results (time to failure),
and structure / dynamics metrics use each replica's stable part only.

`bench` is a composition of the stages in :mod:`jaxbench.stages` (which reference each metric uses is
said there); the numbers come from :mod:`jaxbench.scoring`, the figures from :mod:`jaxbench.plots` and
the page from :mod:`jaxbench.report`.
"""


from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from . import runs, stages
from .reference import reference_split as default_reference_split
from .report import load_results, write_bench_report
from .scoring import BenchSettings, na


class _Results:
    """results.json, rewritten atomically after every stage so an interrupted bench keeps what it finished."""

    def __init__(self, path: Path, initial: dict):
        self.path = path
        self.data = initial
        self.save()

    def __setitem__(self, key, value):
        self.data[key] = value
        self.save()

    def __getitem__(self, key):
        return self.data[key]

    def save(self):
        runs.write_json(self.path, self.data)


SCORES = ("structure", "stability", "violation", "oracle_on_model_frames", "dynamics", "free_energy")


def _previous_results(path: Path) -> dict:
    """The results.json an earlier (maybe interrupted) run left, or {} (none, or unreadable)."""
    try:
        data = runs.read_json(path) if path.is_file() else {}
    except Exception:  # noqa: BLE001 - a broken file only means nothing is reused
        return {}
    return data if isinstance(data, dict) else {}


def bench(
    model,
    dataset: str,
    out,
    *,
    run=None,
    train_budget="60m",
    max_epochs: int | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    protocol="egraffbench",
    replicas: int | None = None,
    steps: int | None = None,
    temperature: float | None = None,
    timestep: float | None = None,
    oracle=None,
    seed: int = 0,
    dtype: str = "float32",
    settings: BenchSettings | None = None,
    progress: bool = True,
    data_dir=None,
    plots: bool = True,
    train_kw: dict | None = None,
    reference_split: str | None = "auto",
) -> dict[str, Any]:
    """Train (or reuse `run`), evaluate, simulate and score `model` on `dataset`; write `out`.

    `model`: a model card name or dict (ignored when `run` is given). `protocol`: a protocol card name,
    YAML path or :class:`jaxbench.md.Protocol`; `replicas` / `steps` / `temperature` / `timestep`
    override it. `oracle`: an :class:`jaxbench.md.EnergyModel` that is the ground truth (e.g. the
    classical potential behind a generated dataset). `reference_split`: the frames that are the structure
    reference without an oracle ('auto': the test set at the protocol's temperature, e.g. 3BPA's
    test_600K at 600 K; None: no reference frames at this state point). Re-running with the same `out` reuses the finished
    training run (and resumes an interrupted one). Returns the results dict (also in out/results.json).
    """
    from . import data

    out = Path(out)
    spec = data.get(dataset, data_dir=data_dir)
    dataset = spec.name
    # everything that can fail cheaply comes before compute
    proto = stages.resolve_protocol(protocol, dataset, replicas=replicas, steps=steps, temperature=temperature,
                                    timestep=timestep)
    settings = settings or BenchSettings.from_protocol(proto)
    if reference_split == "auto":
        reference_split = default_reference_split(dataset, proto, data_dir)
    run_dir = Path(run) if run is not None else out / "train"
    if run is not None:
        runs.read_run(run_dir)  # names a missing / broken run now
    out.mkdir(parents=True, exist_ok=True)
    with runs.locked(out, "benchmark directory"):
        return _run_stages(out, spec, dataset, proto, settings, run, run_dir, model, oracle, reference_split,
                           {**dict(budget=train_budget, max_epochs=max_epochs, seed=seed, dtype=dtype, n_train=n_train,
                                   n_val=n_val, progress=progress, data_dir=data_dir), **(train_kw or {})},
                           n_test=n_test, plots=plots, seed=seed, progress=progress, data_dir=data_dir)


def _run_stages(out, spec, dataset, proto, settings, run, run_dir, model, oracle, reference_split, kw, *, n_test, plots,
                seed, progress, data_dir) -> dict[str, Any]:
    oracle_name = getattr(oracle, "name", None) if oracle is not None else None
    previous = _previous_results(out / "results.json")
    res = _Results(out / "results.json", {
        "jaxbench_bench": 1, "dataset": dataset, "periodic": spec.periodic, "started": time.time(),
        "protocol": proto.to_dict(), "settings": dataclasses.asdict(settings), "oracle": oracle_name,
    })

    reuse = run is not None or (out / "results.json").exists() and stages.training_finished(run_dir)
    training = stages.train_stage(model, dataset, run_dir, reuse=reuse, train_kw=kw)
    res["training"] = training.section
    res["model"], res["architecture"], res["run_dir"] = training.model, training.architecture, str(run_dir)

    # the test-set errors of these exact parameters are already known after an interrupted run: not redone
    accuracy_key = dict(dataset=dataset, n_test=n_test, checkpoint_sha256=stages.best_checkpoint_sha256(run_dir))
    if previous.get("accuracy_key") == accuracy_key and isinstance(previous.get("accuracy"), dict):
        res["accuracy"] = previous["accuracy"]
    else:
        res["accuracy"] = stages.evaluate_stage(run_dir, dataset, n_test=n_test, plots=plots,
                                                data_dir=data_dir).section()
    res["accuracy_key"] = accuracy_key

    sim = stages.simulate_stage(run_dir, spec, proto, oracle=oracle, oracle_name=oracle_name,
                                reference_split=reference_split, settings=settings, seed=seed, out=out,
                                progress=progress, data_dir=data_dir)
    res["simulation"] = sim.section

    # scores are a pure function of the committed trajectories and the settings: an earlier run's are kept
    # while the frames' digest and the settings are the same (and its plots were drawn, where plots are wanted)
    scoring_key = dict(trajectories_sha256=stages.trajectories_sha256(out), protocol=proto.to_dict(),
                       settings=dataclasses.asdict(settings), dataset=dataset, oracle=oracle_name, seed=seed)
    scored = previous.get("scored")
    if (previous.get("scoring_key") == scoring_key and isinstance(scored, list) and all(k in previous for k in scored)
            and (not plots or stages.plots_present(out, previous.get("plots")))):
        for k in scored:
            res[k] = previous[k]
        res["scored"], res["scoring_key"], res["scores_reused"] = scored, scoring_key, True
        if plots:
            res["plots"] = previous["plots"]
    else:
        structure = stages.score_structure(sim, dataset, proto, settings)
        res["structure"] = structure.section
        res["stability"] = stages.score_stability(sim, proto, settings)
        res["violation"] = stages.score_violations(sim, dataset, spec.trajectory, proto, data_dir)
        if sim.reference.trajectory is not None:
            res["oracle_on_model_frames"] = stages.score_oracle_on_model_frames(sim, oracle, oracle_name)
        res["dynamics"] = stages.score_dynamics(sim, spec, settings)
        free_energy = None
        if proto.metadynamics is not None:
            free_energy = stages.score_free_energy(sim.start, sim.trajectory, sim.section["failed"], spec, proto,
                                                   seed=seed, out=out, first_unstable_frame=sim.first_unstable_frame)
            res["free_energy"] = free_energy.section
        res["scored"], res["scores_reused"] = [k for k in SCORES if k in res.data], False
        res["scoring_key"] = scoring_key
        if plots:
            res["plots"] = stages.plot_stage(out, res.data, sim, structure, free_energy, proto.kT)
    res["finished"] = time.time()

    write_bench_report(out, res.data)
    return res.data


__all__ = ["bench", "BenchSettings", "load_results", "na"]
