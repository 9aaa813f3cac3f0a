"""Reports: one benchmark's report.md, and EGraFFBench-style tables over many benchmarks.

    jaxbench report OUT1 OUT2 ... [--out DIR]

Tables (markdown and CSV), each of our numbers beside the published one (EGraFFBench journal version):
  Table 1  energy / force MAE (meV, meV/Å) on the test split
  Table 2  JSD and Wright's factor of the RDF (g(r) periodic, h(r) molecules)
  Table 3  geometric means of EV (x 1e5) and FV, mean (std) over replicas
  Table 4  training time per epoch (min) and simulation time (min)
The published numbers come from the copy in `jaxbench/paper/published.json`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .errors import JaxbenchError
from .tables import fmt, mean_std, published

DATASET_LABELS = {
    "md17-aspirin": "Aspirin", "md17-ethanol": "Ethanol", "md17-naphthalene": "Naphthalene",
    "md17-salicylic_acid": "Salicylic acid", "3bpa": "3BPA", "acac": "Acetylacetone", "lips": "LiPS",
    "lips20": "LiPS20", "gete": "GeTe",
}
MODEL_LABELS = {
    "nequip": "NequIP", "allegro": "Allegro", "botnet": "BOTNet", "mace": "MACE", "equiformer": "Equiformer",
    "torchmdnet": "TorchMDNet", "painn": "PaiNN", "dimenetpp": "DimeNET++",
}


def paper_row(table: str, dataset: str, architecture: str | None, paper: str = "egraffbench") -> dict | None:
    """The published row of `table` for (dataset, architecture), or None."""
    label = DATASET_LABELS.get(dataset) or DATASET_LABELS.get(dataset.split("-")[0])
    model = MODEL_LABELS.get(architecture or "")
    if label is None or model is None:
        return None
    for row in published()[paper][table]["rows"]:
        if row["dataset"].lower() == label.lower() and row["model"] == model and "split" not in row:
            return row
    return None


def _value(section: dict | None, key: str):
    if not section or section.get("not_applicable"):
        return None
    return section.get(key)


def _reason(section: dict | None) -> str:
    if section is None:
        return "not run"
    return f"n/a: {section['not_applicable']}" if section.get("not_applicable") else ""


def tables(results: list[dict]) -> dict[str, dict[str, Any]]:
    """{table id: {'title', 'header', 'rows'}} with ours beside the paper's."""
    t1, t2, t3, t4 = [], [], [], []
    for r in results:
        ds, arch, name = r["dataset"], r.get("architecture"), r.get("model")
        label = f"{name}"
        acc = r.get("accuracy", {})
        p1, p2, p3, p4 = (paper_row(t, ds, arch) for t in ("table1", "table2", "table3", "table4"))
        t1.append([ds, label, fmt(acc.get("energy_mae_meV")), fmt(p1 and p1["E"]), fmt(acc.get("forces_mae_meV_A")),
                   fmt(p1 and p1["F"])])
        st = r.get("structure")
        if st and not st.get("not_applicable"):
            t2.append([ds, label, mean_std(st["jsd_nats"]), fmt(p2 and p2["JSD"]), mean_std(st["wright_factor_pct"]),
                       fmt(p2 and p2["WF"]), fmt((st.get("noise_floor_reference_halves") or {}).get("wright_factor_pct"))])
        else:
            t2.append([ds, label, _reason(st), fmt(p2 and p2["JSD"]), "", fmt(p2 and p2["WF"]), ""])
        v = r.get("violation")
        if v and not v.get("not_applicable"):
            t3.append([ds, label, mean_std(v["EV"], 1e5), mean_std({"mean": p3 and p3["E"], "std": p3 and p3["E_std"]}) if p3 else "—",
                       mean_std(v["FV"]), mean_std({"mean": p3["F"], "std": p3["F_std"]}) if p3 else "—"])
        else:
            t3.append([ds, label, _reason(v), mean_std({"mean": p3["E"], "std": p3["E_std"]}) if p3 else "—", "",
                       mean_std({"mean": p3["F"], "std": p3["F_std"]}) if p3 else "—"])
        tr, sim = r.get("training", {}), r.get("simulation", {})
        i_tot, n_rep = sim.get("inference_time_min"), sim.get("replicas") or 1
        i_ours = "—" if i_tot is None else f"{fmt(i_tot)} / {fmt(i_tot / n_rep)}"
        t4.append([ds, label, fmt(tr.get("time_per_epoch_min")), fmt(p4 and p4["T"]), i_ours,
                   fmt(p4 and p4["I"]), fmt((sim.get("speed") or {}).get("atom_steps_per_s"))])
    return {
        "table1": {"title": "Table 1: energy MAE (meV) and force MAE (meV/Å), test split",
                   "header": ["dataset", "model", "E ours", "E paper", "F ours", "F paper"], "rows": t1},
        "table2": {"title": "Table 2: RDF Jensen-Shannon divergence (ours: nats, normalised RDFs) and Wright's factor "
                            "(ours: %, with the square root; the paper's JSD scale differs, see docs)",
                   "header": ["dataset", "model", "JSD ours", "JSD paper", "WF % ours", "WF paper",
                              "WF ref-vs-ref floor"], "rows": t2},
        "table3": {"title": "Table 3: geometric mean of EV (x 1e5) and FV, mean (std) over replicas",
                   "header": ["dataset", "model", "EV x1e5 ours", "EV x1e5 paper", "FV ours", "FV paper"], "rows": t3},
        "table4": {"title": "Table 4: training time per epoch (min) and simulation time (min; paper: mean of 5 "
                            "simulations of 1000 steps run one by one in ASE on a CPU; ours: all replicas in one "
                            "compiled batch on this machine, total and per replica, compile included)",
                   "header": ["dataset", "model", "T ours", "T paper (A100)", "I ours (all replicas / per replica)",
                              "I paper (CPU, per simulation)",
                              "atom-steps/s ours"], "rows": t4},
    }


def markdown_table(t: dict) -> str:
    lines = [f"### {t['title']}", "", "| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
    return "\n".join(lines) + "\n"


def load_results(path) -> dict[str, Any]:
    """A benchmark's results.json (`path`: the file or its directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise JaxbenchError(f"no benchmark results at {p} (run `jaxbench bench` first)")
    with open(p) as f:
        return json.load(f)


PAPERS = ("egraffbench", "fu2023", "ms25")


def report(paths, out=None, paper: str = "egraffbench") -> dict[str, Any]:
    """The paper's tables over the benchmark directories `paths` ('egraffbench': Tables 1-4; 'fu2023':
    FaNE's Tables 4-6, 8, 9, 11; 'ms25': training rate, size extensivity, observables, speed of
    `jaxbench bench --task ms25` directories); written to `out` (report.md + table*.csv) if given."""
    if paper not in PAPERS:
        raise JaxbenchError(f"unknown paper '{paper}' (known: {', '.join(PAPERS)})")
    if paper == "ms25":
        from .ms25 import load, ms25_tables

        results = [load(p) for p in paths]
        tabs = ms25_tables(results)
        source = ("Published values: MS25 (Maxson et al.) Table 8, as printed, on MS25's own (DFT / classical) data; ours are "
                  "on jaxbench's EMT-labelled sets, so the systems differ: context, not a like-for-like comparison.")
    elif paper == "fu2023":
        from .report_fane import FOOTNOTE, fane_tables

        tabs = fane_tables([load_results(p) for p in paths])
        source = f"Published values: Fu et al., Forces are not Enough (TMLR 2023), as printed. {FOOTNOTE}"
    else:
        tabs = tables([load_results(p) for p in paths])
        source = "Published values: EGraFFBench (Bihani et al., Digital Discovery 2024), as printed."
    md = ["# jaxbench report", "", "Benchmarks: " + ", ".join(str(p) for p in paths), "", source, ""]
    md += [markdown_table(t) for t in tabs.values()]
    text = "\n".join(md)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
        for key, t in tabs.items():
            with open(out / f"{key}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(t["header"])
                w.writerows(t["rows"])
    return {"tables": tabs, "markdown": text}


def write_bench_report(out, r: dict) -> Path:
    """report.md of one benchmark directory (numbers from results.json, plots beside it)."""
    out = Path(out)
    tabs = tables([r])
    lines = [f"# {r.get('model')} on {r['dataset']}", ""]
    sim = r.get("simulation", {})
    proto = r.get("protocol", {})
    lines.append(f"Protocol: {proto.get('name')} ({proto.get('ensemble')}, {proto.get('temperature_K')} K, "
                 f"{proto.get('timestep_fs')} fs, {proto.get('steps')} steps, {proto.get('replicas')} replicas).")
    failed = [i for i, f in enumerate(sim.get("failed", [])) if f]
    if failed:
        lines.append("Failed replicas: " + ", ".join(
            f"{i} at {sim['failure_time_fs'][i]:g} fs ({sim['failure_reason'][i]})" for i in failed) + ".")
    else:
        lines.append(f"All {sim.get('replicas')} replicas ran {sim.get('steps')} steps without failure.")
    stab = r.get("stability", {})
    if stab.get("stable_time_fs"):
        lines.append(f"Stable time (fs): {mean_std(stab['stable_time_fs'])} of {stab.get('simulated_time_fs')} fs.")
    dyn = r.get("dynamics", {})
    if dyn and not dyn.get("not_applicable"):
        for el, s in dyn["diffusivity_cm2_s"].items():
            ref = dyn.get("reference_diffusivity_cm2_s") or {}
            ref_s = mean_std(ref.get(el)) if isinstance(ref, dict) and el in ref else (_reason(ref) or "none published")
            lines.append(f"Diffusivity {el}: {mean_std(s)} cm²/s (reference: {ref_s}).")
    oom = r.get("oracle_on_model_frames")
    if oom:
        lines.append(f"Model vs oracle on the model's own frames: force MAE {mean_std(oom.get('force_mae_meV_A'))} meV/Å, "
                     f"EV x1e5 {mean_std(oom['EV'], 1e5)}, FV {mean_std(oom['FV'])}.")
    lines.append("")
    lines += [markdown_table(t) for t in tabs.values()]
    for name, p in (r.get("plots") or {}).items():
        try:
            rel = Path(p).relative_to(out)
        except ValueError:
            rel = Path(p)
        lines.append(f"![{name}]({rel})")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
