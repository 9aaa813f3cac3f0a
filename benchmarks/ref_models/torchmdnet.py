"""Reference for the `torchmdnet` architecture: torchmd-net's equivariant transformer (pip `torchmd-net`).

Loaded by benchmarks/param_counts.py, which injects `_HP` (the card-hyperparameter reader) as a global.
The model is built by torchmd-net's own `create_model` (TorchMD_ET representation + the output model it
picks: "Scalar" -> EquivariantScalar for the ET) from the card's keys, which are torchmd-net's names.
"""

from __future__ import annotations


def _ref_torchmd_et(h, num_species: int):  # h: _HP
    import torch
    from torchmdnet.models.model import create_model

    torch.set_default_dtype(torch.float32)
    args = dict(
        model="equivariant-transformer",
        precision=32,
        embedding_dimension=int(h.get("embedding_dimension", default=128)),
        num_layers=int(h.get("num_layers", default=6)),
        num_rbf=int(h.get("num_rbf", default=64)),  # torchmd-train default
        rbf_type=h.get("rbf_type", default="expnorm"),
        trainable_rbf=bool(h.get("trainable_rbf", default=False)),
        activation=h.get("activation", default="silu"),
        attn_activation=h.get("attn_activation", default="silu"),
        neighbor_embedding=bool(h.get("neighbor_embedding", default=False)),
        num_heads=int(h.get("num_heads", default=8)),
        distance_influence=h.get("distance_influence", default="both"),
        vector_cutoff=bool(h.get("vector_cutoff", default=False)),
        cutoff_lower=float(h.get("cutoff_lower", default=0.0)),
        cutoff_upper=float(h.get("r_max", required=True)),
        # jaxbench embeds species indices 0..S-1; torchmd-net indexes its embeddings by Z < max_z.
        # max_z = S gives the same tables (the card's max_z = 100 only adds never-used rows).
        max_z=num_species,
        max_num_neighbors=32,
        output_model=h.get("output_model", default="Scalar"),
        reduce_op="add",
        prior_model=None,
        atom_filter=-1,
        derivative=True,
        aggr="add",
    )
    model = create_model(args)
    hidden = args["embedding_dimension"]
    notes = [
        f"max_z={num_species} (species indices); torchmd-net's max_z=100 adds {2 * (100 - num_species) * hidden} "
        f"parameters (2 x (100 - {num_species}) x {hidden} embedding rows of absent elements)",
        f"output model {type(model.output_model).__name__}",
    ]
    return model, notes


REFERENCES = [("TorchMD_ET", "torchmd-net", _ref_torchmd_et)]
