"""schnetpack's PaiNN (+ Atomwise energy head) with a card's hyperparameters, for parameter counts.

Runs in the reference venv (torch + schnetpack 2.1). `_HP` is injected by benchmarks/param_counts.py.
schnetpack 2.1.1 was installed with `pip install --no-deps schnetpack==2.1.1` (its requirements would
replace torch) plus `dirsync fasteners omegaconf hydra-core antlr4-python3-runtime` (also --no-deps).
"""

from __future__ import annotations


def import_schnetpack():
    """schnetpack 2.1.1's data loader imports `T_co` from torch.utils.data.dataloader, which torch >= 2.5
    no longer defines; it is only a typing variable, so provide it before the import."""
    import typing

    import torch.utils.data.dataloader as dl

    if not hasattr(dl, "T_co"):
        dl.T_co = typing.TypeVar("T_co", covariant=True)
    import schnetpack

    return schnetpack


def _activation(name):
    import torch
    import torch.nn.functional as F

    from schnetpack.nn.activations import shifted_softplus

    return {"ssp": shifted_softplus, "shifted_softplus": shifted_softplus, "silu": F.silu, "tanh": torch.tanh}[name]


def _ref_painn(h, num_species: int):
    import torch

    spk = import_schnetpack()
    r_max = float(h.get("r_max", required=True))
    n_atom_basis = int(h.get("n_atom_basis", default=128))
    if h.get("radial_basis", default="bessel") != "bessel":
        raise ValueError("only the Bessel radial basis is compared")
    rep = spk.representation.PaiNN(
        n_atom_basis=n_atom_basis,
        n_interactions=int(h.get("n_interactions", default=3)),
        radial_basis=spk.nn.BesselRBF(n_rbf=int(h.get("n_rbf", default=20)), cutoff=r_max),
        cutoff_fn=spk.nn.CosineCutoff(r_max),
        activation=_activation(h.get("activation", default="silu")),
        shared_interactions=bool(h.get("shared_interactions", default=False)),
        shared_filters=bool(h.get("shared_filters", default=False)),
        epsilon=float(h.get("epsilon", default=1e-8)),
        # one row per species, as jaxbench (schnetpack's default nn.Embedding(100, F) has 100 rows)
        nuclear_embedding=torch.nn.Embedding(num_species, n_atom_basis),
    )
    head = spk.atomistic.Atomwise(n_in=n_atom_basis, n_layers=int(h.get("readout_n_layers", default=2)),
                                  activation=_activation(h.get("readout_activation", default="silu")),
                                  output_key="energy")
    model = spk.model.NeuralNetworkPotential(representation=rep, input_modules=[spk.atomistic.PairwiseDistances()],
                                             output_modules=[head])
    notes = [f"embedding nn.Embedding({num_species}, {n_atom_basis}) instead of schnetpack's (100, {n_atom_basis}): "
             f"+{(100 - num_species) * n_atom_basis:,} with the default"]
    return model, notes


REFERENCES = [("representation.PaiNN + atomistic.Atomwise", "schnetpack", _ref_painn)]
