"""Equiformer reference parameter count (torch side of benchmarks/param_counts.py).

The reference code, github.com/atomicarchitects/equiformer, is not a package (no setup.py, not on
PyPI; GitHub is not reachable from the build machine) and imports torch_cluster / torch_scatter /
ocpmodels at module level, none of which is in the reference venv. What fixes its parameter count
is only its *constructor*: which e3nn-0.4.4 TensorProducts (instructions, 'uvu' / 'uvw' modes,
internal or external weights), which torch Linear / LayerNorm layers and which bare Parameters it
creates. This file rebuilds exactly that construction of `GraphAttentionTransformerMD17`
(nets/graph_attention_transformer_md17.py with the building blocks of
nets/graph_attention_transformer.py, tensor_product_rescale.py, radial_func.py, layer_norm.py) from the
real e3nn 0.4.4 `o3.TensorProduct` and torch modules, and counts `model.parameters()`.
There is no forward pass: the point is an independent count of the same layers (e3nn-torch's own
`weight_numel`, its own Irreps algebra), not a second implementation.

Two rows: the one-hot over the card's species (as jaxbench), and over the reference's 64 atom types
(`_MAX_ATOM_TYPE = 64`; the difference is (64 - S) x (number of 0e embedding channels) weights).
"""

from __future__ import annotations


def _build(h, num_species: int, max_atom_type: int | None = None):
    import torch
    from e3nn import o3

    nn = torch.nn

    def sort_even_first(irreps):
        """Equiformer's sort_irreps_even_first: (sorted irreps, permutation old index -> new index)."""
        order = sorted(range(len(irreps)), key=lambda i: (irreps[i].ir.l, -irreps[i].ir.p, i))
        perm = [0] * len(order)
        for new, old in enumerate(order):
            perm[old] = new
        return o3.Irreps([irreps[i] for i in order]), perm

    class TPRescale(nn.Module):
        """TensorProductRescale: e3nn TensorProduct (path_normalization 'none') + a bias per 0e output."""

        def __init__(self, in1, in2, out, instructions, bias=True, internal_weights=None):
            super().__init__()
            self.irreps_out = o3.Irreps(out)
            self.tp = o3.TensorProduct(o3.Irreps(in1), o3.Irreps(in2), self.irreps_out, instructions,
                                       internal_weights=internal_weights, shared_weights=internal_weights,
                                       path_normalization="none")
            scalars = [mul for mul, ir in self.irreps_out.simplify() if bias and ir == o3.Irrep("0e")]
            self.bias = nn.ParameterList([nn.Parameter(torch.zeros(mul)) for mul in scalars])

    def fctp(in1, in2, out, bias=True, internal_weights=None):
        in1, in2, out = o3.Irreps(in1), o3.Irreps(in2), o3.Irreps(out)
        ins = [(i1, i2, io, "uvw", True, 1.0) for i1, (_, ir1) in enumerate(in1)
               for i2, (_, ir2) in enumerate(in2) for io, (_, iro) in enumerate(out) if iro in ir1 * ir2]
        return TPRescale(in1, in2, out, ins, bias=bias, internal_weights=internal_weights)

    def linear_rs(irreps_in, irreps_out, bias=True):
        return fctp(irreps_in, "1x0e", irreps_out, bias=bias, internal_weights=True)

    def dtp(irreps_in, irreps_edge, irreps_filter, internal_weights):
        """DepthwiseTensorProduct: uvu paths kept if ir_out is in irreps_filter or is 0e, sorted even-first."""
        irreps_in, irreps_edge, irreps_filter = o3.Irreps(irreps_in), o3.Irreps(irreps_edge), o3.Irreps(irreps_filter)
        outs, ins = [], []
        for i, (mul, ir_in) in enumerate(irreps_in):
            for j, (_, ir_edge) in enumerate(irreps_edge):
                for ir_out in ir_in * ir_edge:
                    if ir_out in irreps_filter or ir_out == o3.Irrep(0, 1):
                        ins.append((i, j, len(outs), "uvu", True))
                        outs.append((mul, ir_out))
        irreps_out, p = sort_even_first(o3.Irreps(outs))
        ins = [(a, b, p[k], m, t) for a, b, k, m, t in ins]
        return TPRescale(irreps_in, irreps_edge, irreps_out, ins, bias=False, internal_weights=internal_weights)

    class RadialProfile(nn.Module):
        def __init__(self, ch):
            super().__init__()
            mods = []
            for i in range(1, len(ch)):
                mods.append(nn.Linear(ch[i - 1], ch[i], bias=i != len(ch) - 1))
                if i != len(ch) - 1:
                    mods += [nn.LayerNorm(ch[i]), nn.SiLU()]
            self.net = nn.Sequential(*mods)
            self.offset = nn.Parameter(torch.zeros(ch[-1]))

    def gate_irreps(irreps):
        irreps = o3.Irreps(irreps)
        scalars = o3.Irreps([(m, ir) for m, ir in irreps if ir == o3.Irrep("0e")]).simplify()
        gated = o3.Irreps([(m, ir) for m, ir in irreps if ir != o3.Irrep("0e")]).simplify()
        gates = o3.Irreps([(m, "0e") for m, _ in gated]).simplify()
        return (scalars + gates + gated).simplify()

    class LayerNormV2(nn.Module):
        def __init__(self, irreps):
            super().__init__()
            irreps = o3.Irreps(irreps)
            self.affine_weight = nn.Parameter(torch.ones(irreps.num_irreps))
            self.affine_bias = nn.Parameter(torch.zeros(sum(m for m, ir in irreps if ir == o3.Irrep("0e"))))

    class SeparableFCTP(nn.Module):
        def __init__(self, irreps_in, irreps_edge, irreps_out, fc_neurons, use_activation, internal_weights):
            super().__init__()
            self.dtp = dtp(irreps_in, irreps_edge, irreps_out, internal_weights)
            self.dtp_rad = RadialProfile(fc_neurons + [self.dtp.tp.weight_numel]) if fc_neurons is not None else None
            lin_out = gate_irreps(irreps_out) if use_activation else o3.Irreps(irreps_out)
            self.lin = linear_rs(self.dtp.irreps_out.simplify(), lin_out)

    class GraphAttention(nn.Module):  # nonlinear_message=True, irreps_pre_attn = irreps_node_input
        def __init__(self, irreps_node, irreps_edge, fc_neurons, irreps_head, num_heads):
            super().__init__()
            self.merge_src = linear_rs(irreps_node, irreps_node, bias=True)
            self.merge_dst = linear_rs(irreps_node, irreps_node, bias=False)
            heads, _ = sort_even_first(o3.Irreps(irreps_head) * num_heads)
            heads = heads.simplify()
            mul_alpha = sum(m for m, ir in heads if ir == o3.Irrep("0e"))
            self.sep_act = SeparableFCTP(irreps_node, irreps_edge, irreps_node, fc_neurons, True, False)
            self.sep_alpha = linear_rs(self.sep_act.dtp.irreps_out, f"{mul_alpha}x0e")
            self.sep_value = SeparableFCTP(irreps_node, irreps_edge, heads, None, False, True)
            self.alpha_dot = nn.Parameter(torch.randn(1, num_heads, mul_alpha // num_heads))
            self.proj = linear_rs(heads, irreps_node)

    class TransBlock(nn.Module):
        def __init__(self, irreps_node, irreps_edge, irreps_out, fc_neurons, irreps_head, num_heads, irreps_mlp_mid):
            super().__init__()
            self.norm_1 = LayerNormV2(irreps_node)
            self.ga = GraphAttention(irreps_node, irreps_edge, fc_neurons, irreps_head, num_heads)
            self.norm_2 = LayerNormV2(irreps_node)
            gate_in = gate_irreps(irreps_mlp_mid)
            self.ffn_fctp_1 = fctp(irreps_node, "1x0e", gate_in)
            self.ffn_fctp_2 = fctp(irreps_mlp_mid, "1x0e", irreps_out)
            changes = o3.Irreps(irreps_node) != o3.Irreps(irreps_out)
            self.ffn_shortcut = fctp(irreps_node, "1x0e", irreps_out) if changes else None

    emb = o3.Irreps(h.get("irreps_node_embedding", default="128x0e+64x1e+32x2e"))
    sh = o3.Irreps(h.get("irreps_sh", default="1x0e+1x1e+1x2e"))
    feature = o3.Irreps(h.get("irreps_feature", default="512x0e"))
    head = h.get("irreps_head", default="32x0e+16x1e+8x2e")
    num_heads = int(h.get("num_heads", default=4))
    mlp_mid = h.get("irreps_mlp_mid", default="384x0e+192x1e+96x2e")
    num_layers = int(h.get("num_layers", default=6))
    fc = [int(h.get("num_basis", default=32))] + [int(x) for x in h.get("radial_hidden", default=[64, 64])]
    n_types = max_atom_type or num_species

    model = nn.Module()
    model.atom_embed = linear_rs(f"{n_types}x0e", emb)
    edge = nn.Module()
    edge.exp = linear_rs("1x0e", emb)
    edge.dw = dtp(emb, sh, emb, internal_weights=False)
    edge.rad = RadialProfile(fc + [edge.dw.tp.weight_numel])
    edge.proj = linear_rs(edge.dw.irreps_out.simplify(), emb)
    model.edge_deg_embed = edge
    model.blocks = nn.ModuleList([TransBlock(emb, sh, feature if i == num_layers - 1 else emb, fc, head, num_heads,
                                             mlp_mid) for i in range(num_layers)])
    model.norm = LayerNormV2(feature)
    model.head = nn.ModuleList([linear_rs(feature, feature), linear_rs(feature, "1x0e")])
    notes = ["constructor rebuilt from e3nn 0.4.4 TensorProduct / torch modules (equiformer is not installable)"]
    if max_atom_type:
        notes.append(f"one-hot over the reference's {max_atom_type} atom types (_MAX_ATOM_TYPE), "
                     f"not {num_species} species")
    return model, notes


REFERENCES = [
    ("GraphAttentionTransformerMD17 construction (S species)", "e3nn", lambda h, s: _build(h, s)),
    ("GraphAttentionTransformerMD17 construction (64 atom types)", "e3nn", lambda h, s: _build(h, s, max_atom_type=64)),
]
