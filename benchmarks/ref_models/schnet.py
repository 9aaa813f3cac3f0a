"""schnetpack's SchNet (+ Atomwise energy head) with a card's hyperparameters, for parameter counts.

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


_ACTS = {"ssp": "shifted_softplus", "shifted_softplus": "shifted_softplus", "silu": "silu", "tanh": "tanh"}


def _activation(name):
    import torch
    import torch.nn.functional as F

    from schnetpack.nn.activations import shifted_softplus

    return {"shifted_softplus": shifted_softplus, "silu": F.silu, "tanh": torch.tanh}[_ACTS[name]]


def _ref_schnet(h, num_species: int):
    import torch

    spk = import_schnetpack()
    r_max = float(h.get("r_max", required=True))
    n_atom_basis = int(h.get("n_atom_basis", default=128))
    n_rbf = int(h.get("n_rbf", default=20))
    rep = spk.representation.SchNet(
        n_atom_basis=n_atom_basis,
        n_interactions=int(h.get("n_interactions", default=6)),
        radial_basis=spk.nn.GaussianRBF(n_rbf=n_rbf, cutoff=r_max),
        cutoff_fn=spk.nn.CosineCutoff(r_max),
        n_filters=h.get("n_filters", default=None),
        shared_interactions=bool(h.get("shared_interactions", default=False)),
        activation=_activation(h.get("activation", default="ssp")),
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


REFERENCES = [("representation.SchNet + atomistic.Atomwise", "schnetpack", _ref_schnet)]


# ---------------------------------------------------------------------------------------------
# Reference numbers of tests/test_schnet.py and tests/test_painn.py (jaxbench == schnetpack with equal weights)
#   /work/refenv/bin/python benchmarks/ref_models/schnet.py   -> JSON {schnet: {energies, forces}, painn: ...}
# ---------------------------------------------------------------------------------------------
TEST_R_MAX = 3.0
TEST_POSITIONS = [[0.0, 0.0, 0.0], [1.1, 0.2, -0.1], [-0.4, 1.3, 0.5], [0.9, -1.2, 1.4], [2.2, 2.9, -1.7]]
TEST_SPECIES = [0, 1, 2, 1, 0]


def det(path: str, shape):
    """Deterministic weights keyed by the jaxbench parameter path (tests/test_schnet.py uses the same)."""
    import zlib

    import numpy as np

    seed = zlib.crc32(path.encode()) % 1000
    return 0.5 * np.sin(0.37 * np.arange(int(np.prod(shape))) + 1.3 * seed).reshape(shape)


def _run_with_det_weights(rep, head, dense_layers):
    """Per-atom energies and forces of schnetpack `rep` + `head.outnet` (float64) on the test geometry.
    `dense_layers`: [(jaxbench path, schnetpack Dense)]; a jaxbench kernel [in, out] is W.T."""
    import numpy as np
    import torch

    rep.double()
    head.double()
    # schnetpack creates its basis buffers in float32: rebuild them in float64 for a 1e-12 comparison
    rb = rep.radial_basis
    if hasattr(rb, "offsets"):
        rb.offsets = torch.linspace(0.0, TEST_R_MAX, rb.n_rbf, dtype=torch.float64)
        rb.widths = torch.abs(rb.offsets[1] - rb.offsets[0]) * torch.ones(rb.n_rbf, dtype=torch.float64)
    else:
        rb.freqs = torch.arange(1, rb.n_rbf + 1, dtype=torch.float64) * np.pi / TEST_R_MAX
    rep.embedding.weight.data = torch.tensor(det("embedding", tuple(rep.embedding.weight.shape)))
    for path, mod in list(dense_layers) + [(f"readout_{i}", m) for i, m in enumerate(head.outnet)]:
        mod.weight.data = torch.tensor(det(path + "/kernel", (mod.in_features, mod.out_features)).T)
        if mod.bias is not None:
            mod.bias.data = torch.tensor(det(path + "/bias", (mod.out_features,)))
    pos = np.asarray(TEST_POSITIONS)
    pairs = [(i, j) for i in range(len(pos)) for j in range(len(pos))
             if i != j and np.linalg.norm(pos[j] - pos[i]) < TEST_R_MAX]
    idx_i, idx_j = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    R = torch.tensor(pos, requires_grad=True)
    out = rep({"_atomic_numbers": torch.tensor(TEST_SPECIES), "_Rij": R[idx_j] - R[idx_i], "_idx_i": idx_i,
               "_idx_j": idx_j})
    e_atoms = head.outnet(out["scalar_representation"])[:, 0]
    (grad,) = torch.autograd.grad(e_atoms.sum(), R)
    return {"energies": e_atoms.tolist(), "forces": (-grad).tolist()}


def reference_outputs_for_tests() -> dict:
    import torch

    spk = import_schnetpack()
    from schnetpack.nn.activations import shifted_softplus

    res = {}
    schnet = spk.representation.SchNet(n_atom_basis=6, n_interactions=2, radial_basis=spk.nn.GaussianRBF(5, TEST_R_MAX),
                                       cutoff_fn=spk.nn.CosineCutoff(TEST_R_MAX), n_filters=4,
                                       nuclear_embedding=torch.nn.Embedding(3, 6))
    layers = []
    for t, b in enumerate(schnet.interactions):
        layers += [(f"interactions_{t}/in2f", b.in2f), (f"interactions_{t}/filter_network_0", b.filter_network[0]),
                   (f"interactions_{t}/filter_network_1", b.filter_network[1]), (f"interactions_{t}/f2out_0", b.f2out[0]),
                   (f"interactions_{t}/f2out_1", b.f2out[1])]
    res["schnet"] = _run_with_det_weights(schnet, spk.atomistic.Atomwise(n_in=6, activation=shifted_softplus), layers)
    painn = spk.representation.PaiNN(n_atom_basis=6, n_interactions=2, radial_basis=spk.nn.BesselRBF(4, TEST_R_MAX),
                                     cutoff_fn=spk.nn.CosineCutoff(TEST_R_MAX), nuclear_embedding=torch.nn.Embedding(3, 6))
    layers = [("filter_net", painn.filter_net)]
    for t, (it, mx) in enumerate(zip(painn.interactions, painn.mixing)):
        layers += [(f"interactions_{t}/interatomic_context_net_0", it.interatomic_context_net[0]),
                   (f"interactions_{t}/interatomic_context_net_1", it.interatomic_context_net[1]),
                   (f"mixing_{t}/intraatomic_context_net_0", mx.intraatomic_context_net[0]),
                   (f"mixing_{t}/intraatomic_context_net_1", mx.intraatomic_context_net[1]),
                   (f"mixing_{t}/mu_channel_mix", mx.mu_channel_mix)]
    res["painn"] = _run_with_det_weights(painn, spk.atomistic.Atomwise(n_in=6), layers)
    return res


if __name__ == "__main__":
    import json

    print(json.dumps(reference_outputs_for_tests()))
