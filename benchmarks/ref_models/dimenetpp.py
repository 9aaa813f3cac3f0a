"""Reference for the dimenetpp architecture: torch_geometric's DimeNetPlusPlus.

`_HP` (benchmarks/param_counts.py) is injected as a global before this module runs; builders read the
card's hyperparameters through it, under jaxbench's key names (PyG's names for the same thing are
aliases where they differ).
"""


def _dimenetpp(h, num_species):
    from torch_geometric.nn.models import DimeNetPlusPlus

    model = DimeNetPlusPlus(
        hidden_channels=h.get("hidden_channels", default=128),
        out_channels=1,
        num_blocks=h.get("num_blocks", default=4),
        int_emb_size=h.get("int_emb_size", default=64),
        basis_emb_size=h.get("basis_emb_size", default=8),
        out_emb_channels=h.get("out_emb_channels", default=256),
        num_spherical=h.get("num_spherical", default=7),
        num_radial=h.get("num_radial", default=6),
        cutoff=float(h.get("r_max", "cutoff", required=True)),
        envelope_exponent=h.get("envelope_exponent", default=5),
        num_before_skip=h.get("num_before_skip", default=1),
        num_after_skip=h.get("num_after_skip", default=2),
        num_output_layers=h.get("num_output_layers", default=3),
        act=h.get("activation", "act", default="swish"),
        output_initializer=h.get("output_initializer", default="zeros"),
    )
    hidden = model.emb.emb.weight.shape[1]
    rows = model.emb.emb.weight.shape[0]
    notes = [f"PyG embeds atomic numbers (Embedding({rows}, {hidden})); jaxbench embeds its {num_species} species: "
             f"expected difference ({rows} - {num_species}) x {hidden} = {(rows - num_species) * hidden:,}"]
    return model, notes


REFERENCES = [("DimeNetPlusPlus", "torch_geometric", _dimenetpp)]
