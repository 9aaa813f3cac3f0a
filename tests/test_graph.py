"""The padded graph type: batching, padding policy, edge vectors, strain -> stress, MD graphs.

Independent references: ASE's neighbour list for distances and ASE's Lennard-Jones calculator for
energies, forces and stress computed through `edge_vectors`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.lj import LennardJones
from ase.neighborlist import neighbor_list

from jaxbench import data
from jaxbench.graph import DEFAULT_POLICY, PaddingPolicy, batch_graph, build_graphs, edge_vectors, md_graph
from jaxbench.neighbors import md_neighbor_list

from .conftest import requires_data

jax.config.update("jax_enable_x64", True)

SIGMA, EPS, RC = 2.0, 0.01, 5.0


def lj_energy(graph, positions=None, strain=None):
    """Per-graph Lennard-Jones energy with ASE's shift (E(rc) = 0), written on edge vectors."""
    vec = edge_vectors(graph, positions=positions, strain=strain, pad_length=2 * RC)
    r2 = jnp.sum(vec**2, axis=-1)
    inside = graph.edge_mask & (r2 < RC**2)
    r2 = jnp.where(inside, r2, 1.0)
    c6 = (SIGMA**2 / r2) ** 3
    e0 = 4 * EPS * ((SIGMA / RC) ** 12 - (SIGMA / RC) ** 6)
    pair = jnp.where(inside, 4 * EPS * (c6**2 - c6) - e0, 0.0)
    return 0.5 * jax.ops.segment_sum(pair, graph.edge_graph, num_segments=graph.num_graphs)


def lj_all(graph):
    def total(positions, strain):
        return jnp.sum(lj_energy(graph, positions, strain))

    energy = lj_energy(graph)
    dpos, dstrain = jax.grad(total, argnums=(0, 1))(graph.positions, jnp.zeros((graph.num_graphs, 3, 3)))
    return energy, -dpos, dstrain / graph.volume[:, None, None]


@pytest.fixture(scope="module")
def mixed_frames(data_root):
    parts = [
        data.load("lips20-P2S5", "test")[:2],  # small triclinic-free cell, images of itself at 5 Å
        data.load("md17-ethanol", "test")[:3],  # molecule
        data.load("lips", "test")[:2],  # triclinic
        data.load("lips20-Li3P", "test")[:1],  # 7.3 Å perpendicular height
    ]
    from jaxbench.frames import Frames

    return Frames.concatenate(parts)


@requires_data
def test_batch_matches_ase_distances_and_lj(mixed_frames):
    fr = mixed_frames
    fg = build_graphs(fr, RC)
    g = fg.batch(np.arange(len(fr)))
    N, E, G = g.num_nodes, g.num_edges, g.num_graphs
    assert (N, E, G) == DEFAULT_POLICY.sizes(
        int(fr.n_atoms.sum()), int(fg.n_edges.sum()), len(fr), edges_per_node=fg.edges_per_node
    )
    assert g.node_mask.sum() == fr.n_atoms.sum() and g.graph_mask.sum() == len(fr)
    assert not g.node_mask[-1] and g.node_graph[-1] == G - 1
    vec = np.asarray(edge_vectors(g, pad_length=10.0))
    assert np.allclose(np.linalg.norm(vec[~g.edge_mask], axis=1), 10.0)
    energy, forces, stress = (np.asarray(x) for x in lj_all(g))
    off = fr.offsets
    node_off = np.concatenate([[0], np.cumsum(fr.n_atoms)])
    for f in range(len(fr)):
        atoms = fr.to_ase(f)
        # distances: the edges of graph f against ASE's neighbour list
        d_ase = np.sort(neighbor_list("d", atoms, RC))
        emask = np.asarray(g.edge_mask & (g.edge_graph == f))
        np.testing.assert_allclose(np.sort(np.linalg.norm(vec[emask], axis=1)), d_ase, atol=1e-9)
        # energy / forces / stress of a pair potential against ASE's LJ calculator
        atoms.calc = LennardJones(sigma=SIGMA, epsilon=EPS, rc=RC, smooth=False)
        np.testing.assert_allclose(energy[f], atoms.get_potential_energy(), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(forces[node_off[f] : node_off[f + 1]], atoms.get_forces(), atol=1e-9)
        if atoms.pbc.any():
            s_ase = atoms.get_stress(voigt=False)
            np.testing.assert_allclose(stress[f], s_ase, atol=1e-10)
        assert off[f + 1] - off[f] == g.n_node[f]
    assert np.all(energy[len(fr) :] == 0) and np.all(forces[~np.asarray(g.node_mask)] == 0)


@requires_data
def test_batched_equals_one_by_one(mixed_frames):
    fg = build_graphs(mixed_frames, RC)
    energy_fn = jax.jit(lj_energy)
    batched = np.asarray(energy_fn(fg.batch(np.arange(len(fg)))))[: len(fg)]
    single = np.array([np.asarray(energy_fn(fg.batch([f])))[0] for f in range(len(fg))])
    np.testing.assert_allclose(batched, single, rtol=1e-12)


@requires_data
def test_sharded_batch_parts_hold_the_frames_in_order(mixed_frames):
    """Data-parallel batches: consecutive parts, one padded shape, each part's per-frame energies equal to
    the frames' own (and room for the full batch size when the batch is short)."""
    fg = build_graphs(mixed_frames, RC)
    energy_fn = jax.jit(lj_energy)
    single = np.array([np.asarray(energy_fn(fg.batch([f])))[0] for f in range(len(fg))])
    idx = np.array([4, 0, 6, 2, 7])
    sharded = fg.sharded_batch(idx, 2, n_graph=6)
    assert sharded.positions.shape[0] == 2 and sharded.senders.shape[0] == 2
    parts = [jax.tree.map(lambda x: x[k], sharded) for k in range(2)]
    assert parts[0].num_graphs == parts[1].num_graphs >= 3 + 1  # room for 6 / 2 frames and a padding graph
    got = []
    for g in parts:
        n_real = int(np.sum(g.graph_mask))
        got += list(np.asarray(energy_fn(g))[:n_real])
        assert int(np.sum(g.node_mask)) == int(np.sum(g.n_node[:n_real]))
    np.testing.assert_allclose(got, single[idx], rtol=1e-12)
    assert [int(np.sum(g.graph_mask)) for g in parts] == [3, 2]


def test_padding_policy_ladder():
    p = PaddingPolicy(growth=1.25, node_multiple=16, edge_multiple=128)
    seen = set()
    for n in range(1, 5000):
        v = p.round(n, 16)
        assert v >= n and v % 16 == 0
        assert v <= max(16, 1.25 * n + 16)  # bounded waste
        seen.add(v)
    assert len(seen) < 30  # few distinct shapes over three orders of magnitude
    N, E, G = p.sizes(100, 1000, 4)
    assert N >= 101 and E >= 1000 and G >= 5


@requires_data
def test_epoch_compiles_few_shapes(data_root):
    fr = data.load("lips20", "val")  # 5 materials of 54-125 atoms
    fg = build_graphs(fr, 5.0)
    shapes = {(b.num_nodes, b.num_edges, b.num_graphs) for b in fg.batches(4, shuffle=True, seed=0)}
    assert len(shapes) <= 6, shapes
    # Same seed, same batches; another seed, another order.
    a = [np.asarray(b.energy) for b in fg.batches(4, shuffle=True, seed=1)]
    b = [np.asarray(b.energy) for b in fg.batches(4, shuffle=True, seed=1)]
    c = [np.asarray(b.energy) for b in fg.batches(4, shuffle=True, seed=2)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # A short last batch is padded like a full one: frames of one size give one shape for the whole epoch,
    # on one device and split over two
    eth = build_graphs(data.load("md17-ethanol", "test")[:7], 5.0)
    assert len({(b.num_nodes, b.num_edges, b.num_graphs) for b in eth.batches(3)}) == 1
    full, short = eth.sharded_batch([0, 1, 2], 2, n_graph=3), eth.sharded_batch([6], 2, n_graph=3)
    assert jax.tree.map(np.shape, full) == jax.tree.map(np.shape, short)
    # One fixed shape that holds every batch.
    sizes = fg.max_sizes(4)
    for idx in np.array_split(np.arange(len(fg)), len(fg) // 4):
        batch_graph(fg, idx, sizes=sizes)


@requires_data
@pytest.mark.parametrize("name", ["lips", "lips20-P2S5"])
def test_md_graph_energy_equals_static_graph(data_root, name):
    fr = data.load(name, "test")[:1]
    static = fr.frame(0)
    fns = md_neighbor_list(static["cell"], static["pbc"], RC, skin=0.5)
    nbrs = fns.allocate(jnp.asarray(static["positions"]))

    @jax.jit
    def energy(positions, nbrs):
        g = md_graph(positions, static["numbers"], static["cell"], static["pbc"], nbrs)
        return lj_energy(g)[0]

    ref = np.asarray(lj_energy(build_graphs(fr, RC).batch([0])))[0]
    np.testing.assert_allclose(np.asarray(energy(jnp.asarray(static["positions"]), nbrs)), ref, rtol=1e-12)
    # Forces through the MD graph equal those of the static graph.
    f_md = -np.asarray(jax.grad(energy)(jnp.asarray(static["positions"]), nbrs))
    g = build_graphs(fr, RC).batch([0])
    f_static = -np.asarray(jax.grad(lambda p: jnp.sum(lj_energy(g, p)))(g.positions))[: len(f_md)]
    np.testing.assert_allclose(f_md, f_static, atol=1e-10)
