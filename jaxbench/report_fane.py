"""FaNE's tables ("Forces are not Enough", Fu et al. TMLR 2023) over benchmark results, beside the paper's.

    jaxbench report OUT1 OUT2 ... --paper fu2023

  Table 5   alanine dipeptide: force MAE, finished runs, F(phi) / F(psi) MAE (kJ/mol), FPS
  Table 6   LiPS: force MAE, stability (ps), RDF MAE, Li diffusivity (1e-9 m²/s), FPS
  Table 4 / 8 / 9 / 11   water-10k / 1k / 90k / 512: force MAE, stability (ps), RDF(O,O), RDF(H,H),
            RDF(H,O), diffusivity MAE of O (1e-9 m²/s), FPS

The published rows come from the project's copy (`jaxbench/paper/published.json`). Under our rows, each
table lists FaNE's published rows for the architectures we did not run ("FaNE: NequIP", paper columns
only), so a model FaNE did not benchmark (MACE) still stands beside the paper's numbers. Tables 4 and 11
have no copy: the paper's text we follow prints their captions but not their bodies (they are images),
so their paper column is empty and the title says so. FaNE's water and alanine data were made with
their own force fields and engines; ours are regenerated with OpenMM (`jaxbench data generate`), so
the columns compare the protocol and the metrics, not the same frames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .tables import fmt, mean_std, published

MODEL_LABELS = {"schnet": "SchNet", "nequip": "NequIP"}  # the architectures FaNE and jaxbench share
WATER_TABLES = {"water-10k": "table4", "water-1k": "table8", "water-90k": "table9", "water-512": "table11"}
FOOTNOTE = ("FaNE's water / alanine frames come from their own classical force fields; ours are regenerated with "
            "OpenMM (flexible SPC/Fw water, amber14 + GBn2 alanine): same protocol and metrics, different frames. "
            "FPS: MD steps per second of one batch of replicas on this machine (FaNE: one simulation on an A100).")


def _paper_row(table: str, dataset_label: str, architecture: str | None) -> dict | None:
    rows = (published().get("fu2023", {}).get(table) or {}).get("rows") or []
    model = MODEL_LABELS.get(architecture or "")
    for row in rows:
        if row["model"] == model and row["dataset"].lower().startswith(dataset_label.lower()):
            return row
    return None


# a generated water-64 dataset of any length goes to the table of its training size (water-1k: 1000 frames)
WATER_BY_TRAINING_SIZE = {1000: "water-1k", 10000: "water-10k", 90000: "water-90k"}


def _training_frames(r: dict) -> int | None:
    """Training frames of a bench result: its training section, else the run directory's dataset.json
    (results written before bench recorded it)."""
    tr = r.get("training") or {}
    if tr.get("n_train") is not None:
        return int(tr["n_train"])
    path = Path(tr["run_dir"]) / "dataset.json" if tr.get("run_dir") else None
    if path is not None and path.is_file():
        n = json.loads(path.read_text()).get("n_train")
        return int(n) if n is not None else None
    return None


def _family(dataset: str, n_train: int | None = None) -> str:
    if dataset.startswith("water-64-n") and n_train in WATER_BY_TRAINING_SIZE:
        return WATER_BY_TRAINING_SIZE[n_train]
    for name in WATER_TABLES:
        if dataset == name or dataset.startswith(name + "-n"):
            return name
    if dataset.startswith("water-512"):
        return "water-512"
    if dataset.startswith("alanine-dipeptide"):
        return "alanine-dipeptide"
    return dataset.split("-")[0]


def _paper(row: dict | None, key: str) -> str:
    if row is None or row.get(key) is None:
        return "—"
    std = row.get(f"{key}_std")
    return fmt(row[key]) + (f" ({fmt(std)})" if std is not None else "")


def _published_rows(table: str, present: set[str | None], columns: list[str]) -> list[list[str]]:
    """FaNE's rows of `table` for the models not in `present`: the paper cells filled, ours blank.
    `columns` names the paper key of each cell after the label (None: one of ours)."""
    rows = (published().get("fu2023", {}).get(table) or {}).get("rows") or []
    shown = {MODEL_LABELS.get(a or "") for a in present}
    out = []
    for row in rows:
        if row["model"] in shown:
            continue
        out.append([f"FaNE: {row['model']}"] + [_finished(row) if key == "#Finished" else _paper(row, key) if key
                                                else "" for key in columns])
    return out


def _finished(row: dict | None) -> str:
    return f"{row['#Finished']}/{row['#Finished_total']}" if row and row.get("#Finished") is not None else "—"


def _stable_ps(r: dict) -> str:
    return mean_std((r.get("stability") or {}).get("stable_time_fs"), 1e-3)


def _fps(r: dict) -> str:
    return fmt(((r.get("simulation") or {}).get("speed") or {}).get("steps_per_s"))


def _diffusivity_mae(r: dict, element: str) -> str:
    """|D_model - D_ref| in 1e-9 m²/s (1 cm²/s = 1e5 x 1e-9 m²/s), replicas' mean against the reference's."""
    dyn = r.get("dynamics") or {}
    if dyn.get("not_applicable"):
        return "—"
    model = (dyn.get("diffusivity_cm2_s") or {}).get(element) or {}
    ref = (dyn.get("reference_diffusivity_cm2_s") or {})
    ref = ref.get(element) if isinstance(ref, dict) else None
    ref_mean = ref.get("mean") if isinstance(ref, dict) else ref
    if model.get("mean") is None or ref_mean is None:
        return "—"
    return fmt(abs(model["mean"] - ref_mean) * 1e5)


def fane_tables(results: list[dict]) -> dict[str, dict[str, Any]]:
    alanine, lips, water = [], [], {t: [] for t in WATER_TABLES.values()}
    archs: dict[str, set] = {}
    for r in results:
        fam, arch = _family(r["dataset"], _training_frames(r)), r.get("architecture")
        force = fmt((r.get("accuracy") or {}).get("forces_mae_meV_A"))
        label = r.get("model") or "?"
        if fam != r["dataset"] and r["dataset"].startswith("water-64-n"):
            label += f" ({r['dataset']}, {_training_frames(r)} train)"
        table_of = {"alanine-dipeptide": "table5", "lips": "table6"}.get(fam, WATER_TABLES.get(fam))
        if table_of:
            archs.setdefault(table_of, set()).add(arch)
        if fam == "alanine-dipeptide":
            p = _paper_row("table5", "alanine", arch)
            fe = r.get("free_energy") or {}
            mae = fe.get("mae_kJ_mol") or {}
            finished = f"{fe['finished_runs']}/{fe['runs']}" if "runs" in fe else "—"
            alanine.append([label, force, _paper(p, "Force"), finished,
                            _finished(p),
                            mean_std(mae.get("F(phi)")), _paper(p, "F(phi)"), mean_std(mae.get("F(psi)")),
                            _paper(p, "F(psi)"), _fps(r), _paper(p, "FPS")])
        elif fam in WATER_TABLES:
            table = WATER_TABLES[fam]
            p = _paper_row(table, "water", arch)
            pairs = (r.get("structure") or {}).get("rdf_mae_per_pair") or {}
            water[table].append([label, force, _paper(p, "Force"), _stable_ps(r), _paper(p, "Stability"),
                                 mean_std(pairs.get("O-O")), _paper(p, "RDF(O,O)"), mean_std(pairs.get("H-H")),
                                 _paper(p, "RDF(H,H)"), mean_std(pairs.get("H-O")), _paper(p, "RDF(H,O)"),
                                 _diffusivity_mae(r, "O"), _paper(p, "Diffusivity"), _fps(r)])
        elif fam == "lips":
            p = _paper_row("table6", "lips", arch)
            st = r.get("structure") or {}
            lips.append([label, force, _paper(p, "Force"), _stable_ps(r), _paper(p, "Stability"),
                         mean_std(st.get("rdf_mae")) if not st.get("not_applicable") else "—", _paper(p, "RDF"),
                         _diffusivity_mae(r, "Li"), _paper(p, "Diffusivity"), _fps(r), _paper(p, "FPS")])
    water_header = ["model", "F ours", "F paper", "stability ps ours", "paper", "RDF(O,O) ours", "paper",
                    "RDF(H,H) ours", "paper", "RDF(H,O) ours", "paper", "D(O) MAE ours", "paper", "FPS ours"]
    titles = {"table4": "Table 4: water-10k", "table8": "Table 8: water-1k", "table9": "Table 9: water-90k",
              "table11": "Table 11: water-512 (generalisation to the large box)"}
    out = {"table5": {"title": "Table 5: alanine dipeptide (force meV/Å; F(phi), F(psi) MAE kJ/mol)",
                      "header": ["model", "F ours", "F paper", "#finished ours", "paper", "F(phi) ours", "paper",
                                 "F(psi) ours", "paper", "FPS ours", "FPS paper"], "rows": alanine},
           "table6": {"title": "Table 6: LiPS (force meV/Å, stability ps, diffusivity MAE 1e-9 m²/s)",
                      "header": ["model", "F ours", "F paper", "stability ps ours", "paper", "RDF MAE ours", "paper",
                                 "D(Li) MAE ours", "paper", "FPS ours", "FPS paper"], "rows": lips}}
    water_paper = [None, "Force", None, "Stability", None, "RDF(O,O)", None, "RDF(H,H)", None, "RDF(H,O)",
                   None, "Diffusivity", None]
    if alanine:
        alanine += _published_rows("table5", archs["table5"],
                                   [None, "Force", None, "#Finished", None, "F(phi)", None, "F(psi)", None, "FPS"])
    if lips:
        lips += _published_rows("table6", archs["table6"],
                                [None, "Force", None, "Stability", None, "RDF", None, "Diffusivity", None, "FPS"])
    for table, rows in water.items():
        if rows:
            rows += _published_rows(table, archs[table], water_paper)
        note = "" if published().get("fu2023", {}).get(table) else (
            " (no paper values: the FaNE text we follow prints this table as an image, not in the project's copy)")
        out[table] = {"title": titles[table] + note + " (force meV/Å, stability ps, D MAE 1e-9 m²/s)",
                      "header": water_header, "rows": rows}
    return {k: v for k, v in out.items() if v["rows"]}
