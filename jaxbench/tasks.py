"""Named out-of-distribution tasks: one training run, several benchmark runs, one summary.

    jaxbench bench --task 3bpa-600k --model nequip
    jaxbench bench --task lips20-ood --model mace
    jaxbench bench --task md17-transfer-aspirin-to-ethanol --model mace

* ``3bpa-600k`` / ``acac-600k`` (EGraFFBench Tables 5-6): trained on the 300 K data, simulated at 600 K
  (`sims/egraffbench-600k.yaml`), beside the same model at 300 K (`sims/egraffbench.yaml`). 3BPA has a
  600 K test set for the structure reference; acetylacetone has none (its 600 K structure metrics are
  reported as not applicable, never against the 300 K frames).
* ``lips20-ood`` (Tables 7-8): trained on the five LiPS20 train materials, then every crystal and test
  material is benchmarked on its own (`lips20-<material>`), and the groups are summarised.
* ``md17-transfer-<a>-to-<b>``: a model of MD17 molecule a run on molecule b (same elements, C/H/O).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnknownNameError

MD17 = ("aspirin", "ethanol", "naphthalene", "salicylic_acid")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    train_dataset: str
    runs: tuple  # ((label, dataset, protocol, group), ...)
    description: str


def _lips20_runs() -> tuple:
    from . import data

    spec = data.get("lips20")
    out = []
    for sid, src in spec.sources.items():
        out.append((f"{src.group}:{sid}", f"lips20-{sid}", "egraffbench", src.group))
    return tuple(out)


def tasks() -> dict[str, Task]:
    t = {
        "3bpa-600k": Task("3bpa-600k", "3bpa", (("300K", "3bpa", "egraffbench", "300 K"),
                                               ("600K", "3bpa", "egraffbench-600k", "600 K")),
                          "3BPA trained at 300 K, simulated at 300 K and 600 K (EGraFFBench Tables 5-6)"),
        "acac-600k": Task("acac-600k", "acac", (("300K", "acac", "egraffbench", "300 K"),
                                               ("600K", "acac", "egraffbench-600k", "600 K")),
                          "acetylacetone trained at 300 K, simulated at 300 K and 600 K (EGraFFBench Tables 5-6)"),
        "lips20-ood": Task("lips20-ood", "lips20", _lips20_runs(),
                           "LiPS20: trained on the train materials, benchmarked on every material (Tables 7-8)"),
    }
    for a, b in itertools.permutations(MD17, 2):
        name = f"md17-transfer-{a}-to-{b}"
        t[name] = Task(name, f"md17-{a}", ((b, f"md17-{b}", "egraffbench", "transfer"),),
                       f"MD17 {a} model simulated on {b} (same elements)")
    return t


def get(name: str) -> Task:
    all_tasks = tasks()
    if name not in all_tasks:
        raise UnknownNameError("task", name, all_tasks)
    return all_tasks[name]


def run_task(name: str, model, out, *, train_budget="60m", run=None, progress: bool = True, **bench_kw) -> dict[str, Any]:
    """Train once (or reuse `run`), then `jaxbench.bench.bench` every run of the task; write out/task.json."""
    from . import runs
    from .bench import bench
    from .reference import reference_split
    from .train import train

    task = get(name)
    out = Path(out)
    run_dir = Path(run) if run is not None else out / "train"
    if run is None:
        ckpt = run_dir / "checkpoints"
        if not (ckpt.is_dir() and any(ckpt.iterdir())):
            train(model, task.train_dataset, budget=train_budget, out=run_dir, progress=progress,
                  **{k: bench_kw[k] for k in ("max_epochs", "n_train", "n_val", "seed", "dtype", "data_dir") if k in bench_kw})
    results = {}
    summary = {"task": name, "description": task.description, "train_dataset": task.train_dataset,
               "run_dir": str(run_dir), "runs": {}}
    for label, dataset, protocol, group in task.runs:
        ref_split = reference_split(dataset, protocol)
        kw = {k: v for k, v in bench_kw.items() if k not in ("max_epochs", "n_train", "n_val", "dtype")}
        r = bench(None, dataset, out / label.replace(":", "-"), run=run_dir, protocol=protocol,
                  reference_split=ref_split, progress=progress, **kw)
        results[label] = r
        summary["runs"][label] = {"dataset": dataset, "protocol": protocol, "group": group,
                                  "reference_split": ref_split, "dir": str(out / label.replace(":", "-"))}
        summary["groups"] = _group_summary(results, summary["runs"])
        runs.write_json(out / "task.json", summary)
    return summary


def _group_summary(results: dict, meta: dict) -> dict[str, Any]:
    """Mean over the runs of each group of: force MAE, EV, FV, JSD, WF (as Tables 7-8 aggregate)."""
    groups: dict[str, dict[str, list]] = {}
    for label, r in results.items():
        g = groups.setdefault(meta[label]["group"], {"forces_mae_meV_A": [], "EV": [], "FV": [], "JSD": [], "WF": []})
        g["forces_mae_meV_A"].append(r.get("accuracy", {}).get("forces_mae_meV_A"))
        v, s = r.get("violation") or {}, r.get("structure") or {}
        g["EV"].append(None if v.get("not_applicable") else v.get("EV", {}).get("mean"))
        g["FV"].append(None if v.get("not_applicable") else v.get("FV", {}).get("mean"))
        g["JSD"].append(None if s.get("not_applicable") else s.get("jsd_nats", {}).get("mean"))
        g["WF"].append(None if s.get("not_applicable") else s.get("wright_factor_pct", {}).get("mean"))
    out = {}
    for g, vals in groups.items():
        out[g] = {}
        for k, xs in vals.items():
            ok = [x for x in xs if x is not None]
            out[g][k] = {"mean": float(np.mean(ok)) if ok else None, "n": len(ok), "of": len(xs)}
    return out
