"""Parameter counts: jaxbench models side by side with the PyTorch reference codes.

For every full model card (`jaxbench.potential.model_cards()`, `-small` variants left out) the JAX
model is built and initialised on one ethanol frame, and the reference model (mace-torch for MACE and
BOTNet, nequip for NequIP, nequip-allegro for Allegro) is built with the SAME hyperparameters, read
from the card's `hyperparameters` block, and 3 species (H, C, O). Parameters are counted, not trained.

Two interpreters take part in one invocation:
  * this script runs in the project's venv (jax, jaxbench; no torch there);
  * the torch side runs as a subprocess of this same file under `--ref-python` (a separate venv with
    torch + mace-torch + nequip + nequip-allegro; see benchmarks/README.md) and prints JSON.

Usage:
  .venv/bin/python benchmarks/param_counts.py [--ref-python /work/refenv/bin/python] [--cards mace,nequip]
        [--egraffbench] [--reference-only] [--data-mirror DIR] [--json OUT.json]

  --egraffbench      use the EGraFFBench hyperparameters (paper Tables 11-14, hard-coded below) instead
                     of the cards (the jaxbench column is still attempted with them).
  --reference-only   torch side only (no jax import): e.g. before the cards / JAX models exist.

Reference counts: `sum(p.numel() for p in model.parameters())` (registered buffers such as E0s,
scale/shift constants, normalisation constants are NOT parameters and are not counted; their size is
reported in the JSON). "trainable" is the `requires_grad` subset. The reference column shows
"all (trainable T)" when the two differ. Ratio = jaxbench / reference; |ratio - 1| <= 5% is the target.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURES = ("nequip", "allegro", "mace", "botnet", "painn", "schnet", "torchmdnet", "dimenetpp", "equiformer")
SPECIES = (1, 6, 8)  # H, C, O: ethanol
TOLERANCE = 0.05

# EGraFFBench (Bihani et al.) Tables 11-14, in jaxbench card key names. Only architecture
# hyperparameters; training settings are irrelevant to the count. Keys absent from the tables are
# left out on purpose so that the reference defaults apply (and show up in the note column).
EGRAFFBENCH = {
    "nequip": {
        "name": "nequip-egraffbench",
        "architecture": "nequip",
        "hyperparameters": {
            "r_max": 5.0,
            "num_layers": 6,
            "l_max": 2,
            "num_features": 32,
            "parity": True,
            "num_basis": 8,
            "bessel_trainable": True,
            "polynomial_p": 6,
            "invariant_layers": 3,
            "invariant_neurons": 64,
        },
    },
    "allegro": {
        "name": "allegro-egraffbench",
        "architecture": "allegro",
        "hyperparameters": {
            "r_max": 5.0,
            "polynomial_p": 6,
            "l_max": 2,
            "num_layers": 2,
            "env_embed_multiplicity": 64,
            "embed_initial_edge": True,
            "two_body_latent_mlp_latent_dimensions": [128, 256, 512, 1024],
            "latent_mlp_latent_dimensions": [1024, 1024, 1024],
            "latent_resnet": True,
            "edge_eng_mlp_latent_dimensions": [128],
        },
    },
    "botnet": {
        "name": "botnet-egraffbench",
        "architecture": "botnet",
        "hyperparameters": {
            "r_max": 5.0,
            "correlation": 1,
            "num_bessel": 8,
            "num_polynomial_cutoff": 5,
            "max_ell": 3,
            "num_interactions": 5,
            "mlp_irreps": "16x0e",
            "hidden_irreps": "16x0e+16x1o+16x2e",
            "gate": "silu",
        },
    },
    "mace": {
        "name": "mace-egraffbench",
        "architecture": "mace",
        "hyperparameters": {
            "r_max": 5.0,
            "correlation": 3,
            "num_bessel": 8,
            "num_polynomial_cutoff": 5,
            "max_ell": 3,
            "num_interactions": 2,
            "mlp_irreps": "16x0e",
            "hidden_irreps": "16x0e+16x1o+16x2e",
            "gate": "silu",
        },
    },
}


# =============================================================================================
# Torch side (runs under --ref-python; imports nothing from jax / jaxbench)
# =============================================================================================
class _HP:
    """Card hyperparameters with key aliases; remembers which reference defaults were applied."""

    def __init__(self, hp: dict):
        self.hp = dict(hp)
        self.defaults: list[str] = []

    def get(self, *names, default=None, required=False):
        for n in names:
            if n in self.hp:  # an explicit null in the card counts as set
                return self.hp[n]
        if required:
            raise KeyError(f"card lacks hyperparameter {names[0]!r}" + (f" (aliases {names[1:]})" if len(names) > 1 else ""))
        self.defaults.append(f"{names[0]}={default!r}")
        return default


def _torch_counts(model) -> dict:
    params = list(model.parameters())
    return {
        "params": int(sum(p.numel() for p in params)),
        "trainable": int(sum(p.numel() for p in params if p.requires_grad)),
        "buffers": int(sum(b.numel() for b in model.buffers())),
    }


def _ref_mace_kwargs(h: _HP, num_species: int, default_correlation: int):
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules

    if h.hp.get("hidden_irreps") is not None:
        hidden = h.hp["hidden_irreps"]
    else:  # MACE's CLI alternative: num_channels x spherical harmonics up to max_L
        ch, max_l = h.get("num_channels", required=True), h.get("max_L", "max_l", required=True)
        hidden = str((int(ch) * o3.Irreps.spherical_harmonics(int(max_l))).sort().irreps.simplify())
    gate = h.get("gate", default="silu")
    kw = dict(
        r_max=float(h.get("r_max", required=True)),
        num_bessel=int(h.get("num_bessel", "num_radial_basis", default=8)),
        num_polynomial_cutoff=int(h.get("num_polynomial_cutoff", "num_cutoff_basis", default=5)),
        max_ell=int(h.get("max_ell", default=3)),
        num_interactions=int(h.get("num_interactions", default=2)),
        num_elements=num_species,
        hidden_irreps=o3.Irreps(hidden),
        MLP_irreps=o3.Irreps(h.get("mlp_irreps", "MLP_irreps", default="16x0e")),
        atomic_energies=np.zeros(num_species),
        avg_num_neighbors=8.0,  # a normalisation constant, not a parameter
        atomic_numbers=list(SPECIES[:num_species]) if num_species <= len(SPECIES) else list(range(1, num_species + 1)),
        gate=modules.gate_dict[str(gate) if gate is not None else "None"],
    )
    correlation = int(h.get("correlation", default=default_correlation))
    radial_mlp = [int(x) for x in h.get("radial_mlp", "radial_MLP", default=[64, 64, 64])]
    return kw, correlation, radial_mlp


def _ref_scaleshift_mace(h: _HP, num_species: int, default_correlation: int, reduced_cg: bool = False):
    """`mace.modules.ScaleShiftMACE` as mace-torch's training CLI builds it (`--model MACE`, which forces
    interaction_first=RealAgnosticInteractionBlock; a card may set `interaction_first`). `reduced_cg`:
    mace-torch >= 0.3.14 `use_reduced_cg=True` (effective only with the cuequivariance package; without
    it mace silently falls back to the full Wigner-chain U matrices, so this refuses instead)."""
    import inspect

    from mace import modules

    kw, correlation, radial_mlp = _ref_mace_kwargs(h, num_species, default_correlation)
    inter = h.get("interaction", default="RealAgnosticResidualInteractionBlock")
    first = h.get("interaction_first", default="RealAgnosticInteractionBlock")
    has_flag = "use_reduced_cg" in inspect.signature(modules.MACE.__init__).parameters
    if reduced_cg:
        if not has_flag:
            raise RuntimeError("this mace-torch has no use_reduced_cg (needs mace-torch >= 0.3.14)")
        from mace.tools import cg

        if not getattr(cg, "CUET_AVAILABLE", False):
            raise RuntimeError("use_reduced_cg needs the cuequivariance package in the reference venv")
        kw["use_reduced_cg"] = True
    elif has_flag:  # the class defaults to True (the training CLI to False): ask for the full U matrices
        kw["use_reduced_cg"] = False

    def build(first_cls):
        return modules.ScaleShiftMACE(
            **kw,
            correlation=correlation,
            radial_MLP=radial_mlp,
            interaction_cls=modules.interaction_classes[inter],
            interaction_cls_first=modules.interaction_classes[first_cls],
            atomic_inter_scale=1.0,
            atomic_inter_shift=0.0,
        )

    model = build(first)
    other = "RealAgnosticInteractionBlock" if first != "RealAgnosticInteractionBlock" else "RealAgnosticResidualInteractionBlock"
    alt = _torch_counts(build(other))["params"]
    return model, [f"with interaction_first={other}: {alt:,}"]


class _NeedsLegacyMace(RuntimeError):
    pass


def _ref_botnet_class(h: _HP, num_species: int):
    """`mace.modules.BOTNet` (removed after mace-torch 0.3.12; broken there: its interaction blocks
    miss the `hidden_irreps` argument, supplied here with functools.partial — it only sets
    an attribute of the Agnostic* blocks and does not change any shape)."""
    import functools

    from mace import modules

    if not hasattr(modules, "BOTNet"):
        raise _NeedsLegacyMace("this mace-torch has no mace.modules.BOTNet (removed after 0.3.12)")
    kw, _correlation, radial_mlp = _ref_mace_kwargs(h, num_species, 1)
    inter = h.get("interaction", default="AgnosticResidualNonlinearInteractionBlock")
    first = h.get("interaction_first", default="AgnosticNonlinearInteractionBlock")
    extra = dict(hidden_irreps=kw["hidden_irreps"], radial_MLP=radial_mlp)
    model = modules.BOTNet(
        **{k: v for k, v in kw.items()},
        interaction_cls=functools.partial(modules.interaction_classes[inter], **extra),
        interaction_cls_first=functools.partial(modules.interaction_classes[first], **extra),
    )
    return model, ["BOTNet-paper blocks; hidden_irreps shim"]


def _nequip_parity(p) -> bool:
    if isinstance(p, str):
        return p.lower() in ("o3_full", "true", "yes", "1")
    return bool(p)


def _allegro_parity(p) -> str:
    if isinstance(p, str):
        return p
    return "o3_full" if p else "so3"


def _nequip_common(h: _HP, num_species: int) -> dict:
    from ase.data import chemical_symbols

    zs = SPECIES[:num_species] if num_species <= len(SPECIES) else tuple(range(1, num_species + 1))
    trainable = bool(h.get("per_species_rescale_trainable", default=False))
    return dict(
        r_max=float(h.get("r_max", required=True)),
        avg_num_neighbors=8.0,
        chemical_symbols=[chemical_symbols[z] for z in zs],
        default_dtype="float32",
        model_dtype="float32",
        per_species_rescale_scales="dataset_forces_rms",
        per_species_rescale_shifts="dataset_per_atom_total_energy_mean",
        per_species_rescale_scales_trainable=trainable,
        per_species_rescale_shifts_trainable=trainable,
        PolynomialCutoff_p=float(h.get("polynomial_p", "PolynomialCutoff_p", default=6)),
        BesselBasis_trainable=bool(h.get("bessel_trainable", "BesselBasis_trainable", default=True)),
    )


def _ref_nequip(h: _HP, num_species: int):
    import torch
    from nequip.model import model_from_config

    nl = h.get("nonlinearity_scalars", default={"e": "silu", "o": "tanh"})
    ng = h.get("nonlinearity_gates", default={"e": "silu", "o": "tanh"})
    config = dict(
        _nequip_common(h, num_species),
        model_builders=["SimpleIrrepsConfig", "EnergyModel", "PerSpeciesRescale", "ForceOutput", "RescaleEnergyEtc"],
        num_layers=int(h.get("num_layers", default=3)),
        l_max=int(h.get("l_max", default=1)),
        parity=_nequip_parity(h.get("parity", default=True)),
        num_features=int(h.get("num_features", default=16)),
        nonlinearity_type=h.get("nonlinearity_type", default="gate"),
        resnet=bool(h.get("resnet", default=False)),
        nonlinearity_scalars=nl,
        nonlinearity_gates=ng,
        num_basis=int(h.get("num_basis", default=8)),
        invariant_layers=int(h.get("invariant_layers", default=2)),
        invariant_neurons=int(h.get("invariant_neurons", default=64)),
        use_sc=bool(h.get("use_sc", default=True)),
    )
    torch.set_default_dtype(torch.float32)
    model = model_from_config(config, initialize=False)
    notes = []
    if not config["per_species_rescale_scales_trainable"]:
        notes.append(f"+{2 * num_species} if per-species scale/shift trainable")
    return model, notes


def _ref_allegro(h: _HP, num_species: int):
    import torch
    from nequip.model import model_from_config

    two_body = [int(x) for x in h.get(
        "two_body_latent_mlp_latent_dimensions", "two_body_latent_dims", "two_body_latent_mlp", "two_body_mlp",
        "two_body_latent", default=[128, 256, 512, 1024])]
    num_basis = int(h.get("num_basis", "num_bessels_per_basis", default=8))
    embed_initial_edge = bool(h.get("embed_initial_edge", default=True))
    config = dict(
        _nequip_common(h, num_species),
        model_builders=["allegro.model.Allegro", "PerSpeciesRescale", "ForceOutput", "RescaleEnergyEtc"],
        num_bessels_per_basis=num_basis,
        # AllegroBesselBasis reads `trainable` under its layer prefix, not BesselBasis_trainable
        radial_basis_trainable=bool(h.hp.get("bessel_trainable", h.hp.get("BesselBasis_trainable", True))),
        l_max=int(h.get("l_max", default=1)),
        parity=_allegro_parity(h.get("parity", default="o3_full")),
        num_layers=int(h.get("num_layers", default=2)),
        num_tensor_features=int(h.get("num_tensor_features", "env_embed_multiplicity", "num_features", default=32)),
        two_body_latent_mlp_latent_dimensions=two_body,
        two_body_latent_mlp_nonlinearity=h.get("two_body_latent_mlp_nonlinearity", default="silu"),
        two_body_latent_mlp_initialization="uniform",
        latent_mlp_latent_dimensions=[int(x) for x in h.get(
            "latent_mlp_latent_dimensions", "latent_dims", "latent_mlp", default=[1024, 1024, 1024])],
        latent_mlp_nonlinearity=h.get("latent_mlp_nonlinearity", default="silu"),
        latent_mlp_initialization="uniform",
        latent_resnet=bool(h.get("latent_resnet", default=True)),
        env_embed_mlp_latent_dimensions=[int(x) for x in h.get("env_embed_mlp_latent_dimensions", default=[])],
        env_embed_mlp_nonlinearity=None,
        env_embed_mlp_initialization="uniform",
        edge_eng_mlp_latent_dimensions=[int(x) for x in h.get(
            "edge_eng_mlp_latent_dimensions", "edge_energy_mlp_latent_dimensions", "edge_eng_mlp", "edge_energy_mlp",
            "edge_energy_mlp_dims", default=[128])],
        edge_eng_mlp_nonlinearity=h.get("edge_eng_mlp_nonlinearity", "edge_energy_mlp_nonlinearity", default=None),
        edge_eng_mlp_initialization="uniform",
    )
    if bool(h.hp.get("normalize_basis", False)):
        # allegro < 0.3 normalised nequip's BesselBasis (NormalizedBasis); 0.3 keeps it behind this flag
        config["use_original_normalized_basis"] = True
        config["num_basis"] = num_basis
    if h.hp.get("initial_scalar_embedding_dim") is not None:
        config["initial_scalar_embedding_dim"] = int(h.hp["initial_scalar_embedding_dim"])
    torch.set_default_dtype(torch.float32)
    model = model_from_config(config, initialize=False)
    notes = []
    # nequip-allegro 0.3 replaced `embed_initial_edge` (one-hot(center) ++ one-hot(neighbour) ++ radial basis
    # fed straight into the two-body MLP, as in allegro 0.2 / EGraFFBench) by ProductTypeEmbedding (per-type
    # embeddings times a linear projection of the basis, width two_body[0]) followed by the full two-body
    # MLP. Derive the allegro-0.2-style count from this model's shapes.
    if embed_initial_edge:
        sd = dict(model.named_parameters())
        te = sum(p.numel() for n, p in sd.items() if ".typeembed." in n)
        first = [p for n, p in sd.items() if ".allegro.latents.0." in n and n.endswith("_weight_0")]
        if first:
            d0 = first[0].shape[1]
            old = _torch_counts(model)["params"] - te - first[0].numel() + (2 * num_species + num_basis) * d0
            notes.append(f"allegro<0.3 (embed_initial_edge, derived): {old:,}")
    if not config["per_species_rescale_scales_trainable"]:
        notes.append(f"+{2 * num_species} if per-species scale/shift trainable")
    return model, notes


def _references(architecture: str):
    """[(label, package, builder(h, num_species) -> (model, notes))] for one architecture."""
    if architecture == "mace":
        return [
            ("ScaleShiftMACE", "mace-torch", lambda h, s: _ref_scaleshift_mace(h, s, 3)),
            ("ScaleShiftMACE use_reduced_cg=True", "mace-torch", lambda h, s: _ref_scaleshift_mace(h, s, 3, reduced_cg=True)),
        ]
    if architecture == "botnet":
        return [
            ("BOTNet", "mace-torch", _ref_botnet_class),
            ("ScaleShiftMACE corr=1 (as EGraFFBench ran 'BOTNet')", "mace-torch", lambda h, s: _ref_scaleshift_mace(h, s, 1)),
        ]
    if architecture == "nequip":
        return [("EnergyModel", "nequip", _ref_nequip)]
    if architecture == "allegro":
        return [("Allegro", "nequip-allegro", _ref_allegro)]
    # Model zoo II: one file per architecture in benchmarks/ref_models/<architecture>.py defining
    # REFERENCES = [(label, pip package, builder(h: _HP, num_species) -> (torch model, notes))].
    path = Path(__file__).resolve().parent / "ref_models" / f"{architecture}.py"
    if path.is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"_ref_models_{architecture}", path)
        mod = importlib.util.module_from_spec(spec)
        mod._HP = _HP  # the builders read hyperparameters through the same helper
        spec.loader.exec_module(mod)
        return list(mod.REFERENCES)
    return []


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torch_worker(legacy_mace: str | None = None, only: str | None = None) -> None:
    """Read [{card, architecture, hyperparameters, num_species}] (JSON, stdin); print results (JSON, stdout).

    `legacy_mace`: a folder holding an older mace-torch (`pip install --no-deps --target DIR
    mace-torch==0.3.12`), put first on sys.path; references that need it (`mace.modules.BOTNet`) are
    built in a second worker process with it when the venv's own mace-torch is newer."""
    import logging
    import traceback
    import warnings

    if legacy_mace:
        sys.path.insert(0, legacy_mace)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    specs = json.load(sys.stdin)
    real_stdout = sys.stdout
    out = {"versions": {}, "python": sys.executable, "results": []}
    legacy_jobs = []  # (index in results, spec, label)
    with contextlib.redirect_stdout(sys.stderr):  # packages print banners; stdout carries the JSON only
        try:
            import torch

            # e3nn 0.4.4 torch.load()s its own constants file, which holds `slice` objects; torch >= 2.6
            # defaults to weights_only=True and refuses them. The file ships inside the e3nn wheel.
            if hasattr(torch.serialization, "add_safe_globals"):
                torch.serialization.add_safe_globals([slice])
        except Exception as e:  # noqa: BLE001
            out["error"] = f"torch import failed: {type(e).__name__}: {e}"
        pkgs = ["torch", "e3nn", "mace-torch", "nequip", "nequip-allegro", "cuequivariance"]
        for spec in specs:
            pkgs += [r[1] for r in _references(spec["architecture"]) if r[1] not in pkgs]
        for pkg in pkgs:
            out["versions"][pkg] = _dist_version(pkg)
        for spec in specs:
            refs = [r for r in _references(spec["architecture"]) if only is None or r[0] == only]
            if not refs and only is None:
                out["results"].append({"card": spec["card"], "reference": None, "package": None,
                                       "error": f"no reference code known for architecture {spec['architecture']!r}"})
            for label, pkg, build in refs:
                row = {"card": spec["card"], "reference": label, "package": f"{pkg} {out['versions'].get(pkg) or '(not installed)'}"}
                if out["versions"].get(pkg) is None:
                    row["error"] = f"{pkg} not installed in the reference venv"
                    out["results"].append(row)
                    continue
                h = _HP(spec["hyperparameters"])
                try:
                    torch.manual_seed(0)
                    model, notes = build(h, int(spec["num_species"]))
                    row.update(_torch_counts(model))
                    row["notes"] = notes
                    row["defaults"] = h.defaults
                except _NeedsLegacyMace as e:
                    row["error"] = str(e)
                    if not legacy_mace:
                        legacy_jobs.append((len(out["results"]), spec, label))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                    row["traceback"] = traceback.format_exc(limit=4)
                out["results"].append(row)
        if legacy_jobs:
            folder = os.environ.get("JAXBENCH_REF_LEGACY_MACE") or str(Path(sys.prefix) / "mace-torch-0.3.12")
            for i, spec, label in legacy_jobs:
                if not Path(folder, "mace").is_dir():
                    out["results"][i]["error"] += (f"; no legacy copy at {folder} (pip install --no-deps --target "
                                                   f"{folder} mace-torch==0.3.12)")
                    continue
                try:
                    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--torch-worker",
                                           "--legacy-mace", folder, "--only", label], input=json.dumps([spec]),
                                          capture_output=True, text=True, timeout=900)
                    sub = json.loads(proc.stdout)
                    res = sub["results"][0]
                    res["package"] = res["package"] + f" (legacy copy in {folder})"
                    out["results"][i] = res
                    out["versions"]["mace-torch (legacy copy)"] = sub["versions"].get("mace-torch")
                except Exception as e:  # noqa: BLE001
                    out["results"][i]["error"] += f"; legacy mace-torch worker failed: {type(e).__name__}: {e}"
    real_stdout.write(json.dumps(out))
    real_stdout.flush()


# =============================================================================================
# JAX side (project venv)
# =============================================================================================
def select_cards(args) -> tuple[list[dict], list[str]]:
    """(cards to count, notes about expected architectures without a card)."""
    missing = []
    if args.egraffbench:
        # model zoo II cards carry the EGraFFBench tables (15-18) themselves
        cards = [copy.deepcopy(EGRAFFBENCH[a]) for a in ARCHITECTURES if a in EGRAFFBENCH]
    elif args.reference_only:  # read the card files directly: no jax import (variants live inside them)
        import yaml

        cards = []
        for p in sorted((REPO / "models").glob("*.yaml")):
            with open(p, encoding="utf-8") as f:
                c = yaml.safe_load(f)
            if isinstance(c, dict) and "name" in c:
                c.pop("variants", None)
                cards.append(c)
        have = {c.get("architecture") for c in cards}
        missing = [a for a in ARCHITECTURES if a not in have]
    else:
        sys.path.insert(0, str(REPO))
        from jaxbench.potential import model_cards

        allc = model_cards()
        cards = [c for c in allc.values() if not c.get("variant_of")]
        have = {c.get("architecture") for c in cards}
        missing = [a for a in ARCHITECTURES if a not in have]
    if args.cards:
        want = set(args.cards.split(","))
        cards = [c for c in cards if c["name"] in want or c.get("architecture") in want]
        missing = [a for a in missing if a in want]
    return cards, missing


def jax_count(card: dict, data_mirror: str | None, cache: dict) -> tuple[int | None, str]:
    """(parameter count, note) of the jaxbench model of `card`."""
    import warnings

    import jax

    from jaxbench.graph import build_graphs, graph_from_atoms

    warnings.filterwarnings("ignore", message="Explicitly requested dtype")  # float64 request without x64: harmless here
    from jaxbench.potential import Potential
    from jaxbench.stats import DatasetStatistics

    r_max = float(card["hyperparameters"]["r_max"])
    note = ""
    if r_max not in cache:
        try:
            from jaxbench import data

            frames = data.load("md17-ethanol", "test", mirror=data_mirror)[:1]
            cache[r_max] = (build_graphs(frames, r_max).batch([0]), "")
        except Exception as e:  # noqa: BLE001 - the count does not depend on the geometry
            import ase.build

            cache[r_max] = (graph_from_atoms(ase.build.molecule("CH3CH2OH"), r_max),
                            f"ase ethanol (md17-ethanol unavailable: {type(e).__name__})")
    graph, note = cache[r_max]
    stats = DatasetStatistics(
        species=SPECIES, atomic_energies={z: 0.0 for z in SPECIES}, energy_per_atom_mean=0.0,
        energy_per_atom_std=1.0, force_rms=1.0, avg_num_neighbors=8.0, cutoff=r_max, n_frames=1,
    )
    pot = Potential.from_card(card, stats)
    params = pot.init(jax.random.PRNGKey(0), graph)
    n = pot.num_parameters(params)
    if hasattr(params, "keys") and set(params.keys()) - {"params"}:
        extra = sorted(set(params.keys()) - {"params"})
        note = (note + "; " if note else "") + f"collections besides 'params' counted: {extra}"
    return n, note


def run_reference(ref_python: str, cards: list[dict]) -> dict:
    specs = [{"card": c["name"], "architecture": c.get("architecture"), "hyperparameters": c.get("hyperparameters", {}),
              "num_species": len(SPECIES)} for c in cards]
    if not Path(ref_python).exists():
        return {"error": f"reference interpreter {ref_python} not found (see benchmarks/README.md)", "versions": {}, "results": []}
    try:
        proc = subprocess.run([ref_python, str(Path(__file__).resolve()), "--torch-worker"], input=json.dumps(specs),
                              capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "reference subprocess timed out", "versions": {}, "results": []}
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"reference subprocess failed (rc {proc.returncode}): {' | '.join(tail)}", "versions": {}, "results": []}


def _fmt(n) -> str:
    return "-" if n is None else f"{n:,}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-python", default=os.environ.get("JAXBENCH_REF_PYTHON", "/work/refenv/bin/python"),
                    help="interpreter of the reference venv (torch, mace-torch, nequip, nequip-allegro)")
    ap.add_argument("--cards", help="comma-separated card names or architectures (default: all full cards)")
    ap.add_argument("--egraffbench", action="store_true", help="EGraFFBench Tables 11-14 hyperparameters instead of the cards")
    ap.add_argument("--reference-only", action="store_true", help="torch side only; do not import jax/jaxbench")
    ap.add_argument("--data-mirror", default=None, help="jaxbench data mirror (default: $JAXBENCH_DATA_MIRROR or ../shared/data/egraffbench)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--legacy-mace", help=argparse.SUPPRESS)
    ap.add_argument("--only", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_worker:
        torch_worker(args.legacy_mace, args.only)
        return 0

    mirror = args.data_mirror or os.environ.get("JAXBENCH_DATA_MIRROR")
    if mirror is None and (REPO.parent / "shared/data/egraffbench").is_dir():
        mirror = str(REPO.parent / "shared/data/egraffbench")

    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    try:
        cards, missing = select_cards(args)
    except Exception as e:  # noqa: BLE001
        print(f"cannot read model cards: {type(e).__name__}: {e}")
        return 1

    ref = run_reference(args.ref_python, cards)
    vers = ", ".join(f"{k} {v}" for k, v in ref.get("versions", {}).items() if v)
    print(f"reference: {ref.get('python', args.ref_python)} | {vers or 'no versions (see error)'}")
    if not args.reference_only:
        try:
            import e3nn_jax
            import flax
            import jax

            from importlib import metadata

            print(f"jaxbench: {sys.executable} | python {platform.python_version()} | jaxbench {metadata.version('jaxbench')}, "
                  f"jax {jax.__version__}, e3nn-jax {e3nn_jax.__version__}, flax {flax.__version__}")
        except Exception as e:  # noqa: BLE001
            print(f"jaxbench: import failed: {type(e).__name__}: {e}")
    print(f"species: {SPECIES} | hyperparameters: {'EGraFFBench Tables 11-14 (built in)' if args.egraffbench else 'model cards'}")
    if ref.get("error"):
        print(f"reference side error: {ref['error']}")
    print()

    by_card: dict[str, list[dict]] = {}
    for r in ref.get("results", []):
        by_card.setdefault(r["card"], []).append(r)

    rows, raw = [], []
    cache: dict = {}
    for card in cards:
        jn, jnote = None, ""
        if not args.reference_only:
            try:
                jn, jnote = jax_count(card, mirror, cache)
            except Exception as e:  # noqa: BLE001
                jnote = f"jaxbench build failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        refs = by_card.get(card["name"]) or [{"card": card["name"], "reference": None, "package": None,
                                              "error": ref.get("error", "no reference result")}]
        for r in refs:
            notes = [n for n in [jnote] if n]
            ratio = "-"
            if r.get("error"):
                notes.append(f"reference failed: {r['error'][:200]}")
                rcol = "-"
            else:
                rcol = _fmt(r["params"]) + (f" (trainable {_fmt(r['trainable'])})" if r["trainable"] != r["params"] else "")
                if jn is not None and r["params"]:
                    q = jn / r["params"]
                    ratio = f"{q:.4f} " + ("ok" if abs(q - 1) <= TOLERANCE else f"OFF >{TOLERANCE:.0%}")
                notes += r.get("notes", [])
                if r.get("defaults"):
                    notes.append("reference defaults: " + ", ".join(r["defaults"]))
            pkg = f"{r['package']} `{r['reference']}`" if r.get("reference") else (r.get("package") or "-")
            rows.append((card["name"], _fmt(jn), rcol, pkg, ratio, "; ".join(notes)))
            raw.append({**r, "card": card["name"], "jaxbench_params": jn, "jaxbench_note": jnote, "ratio": ratio})
    for a in missing:
        rows.append((f"({a})", "-", "-", "-", "-", f"no full model card with architecture '{a}' in models/"))

    print("| card | jaxbench params | reference params | reference package+version | ratio | note |")
    print("|---|---:|---:|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reference": {k: v for k, v in ref.items() if k != "results"}, "rows": raw}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
