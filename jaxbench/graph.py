"""The one graph type of jaxbench, and the one padding policy.

`Graph` is a padded batch of atomic structures (a pytree of arrays) that training, simulation and
metrics share. Models never see positions directly: they get edge vectors from `edge_vectors`, which
also carries the strain used for stress, and node attributes (`species`).

Layout (jraph convention): real graphs first, then one padding graph that owns every padding node;
padding edges join the first padding node to itself with a zero shift and are masked. Sizes are
rounded up by `PaddingPolicy` to a geometric ladder, so an epoch over frames of many sizes compiles
only a handful of shapes.

Edge convention (ASE's): an edge (receiver i, sender j, shift S) is the vector
`D = positions[j] - positions[i] + S @ cell`, pointing from the centre atom i to its neighbour j;
messages flow from senders to receivers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .frames import Frames


@flax.struct.dataclass
class Graph:
    positions: jax.Array  # [n_node, 3] Å
    species: jax.Array  # [n_node] int32 atomic numbers; 0 on padding nodes
    cell: jax.Array  # [n_graph, 3, 3] Å, rows are lattice vectors
    pbc: jax.Array  # [n_graph, 3] bool
    senders: jax.Array  # [n_edge] int32 (neighbour j)
    receivers: jax.Array  # [n_edge] int32 (centre i)
    shifts: jax.Array  # [n_edge, 3] integer image shifts (stored as float for matmul)
    node_graph: jax.Array  # [n_node] int32 graph index of each node
    n_node: jax.Array  # [n_graph] int32 real nodes per graph (padding graph: its padding nodes)
    n_edge: jax.Array  # [n_graph] int32
    node_mask: jax.Array  # [n_node] bool
    edge_mask: jax.Array  # [n_edge] bool
    graph_mask: jax.Array  # [n_graph] bool
    # Labels (zeros where absent; `has_*` says which graphs carry them).
    energy: jax.Array  # [n_graph] eV
    forces: jax.Array  # [n_node, 3] eV/Å
    stress: jax.Array  # [n_graph, 3, 3] eV/Å³ (ASE sign)
    has_energy: jax.Array  # [n_graph] bool
    has_forces: jax.Array  # [n_graph] bool
    has_stress: jax.Array  # [n_graph] bool

    @property
    def num_nodes(self) -> int:
        return self.positions.shape[0]

    @property
    def num_edges(self) -> int:
        return self.senders.shape[0]

    @property
    def num_graphs(self) -> int:
        return self.cell.shape[0]

    @property
    def edge_graph(self) -> jax.Array:
        return self.node_graph[self.receivers]

    @property
    def volume(self) -> jax.Array:
        """[n_graph] cell volumes (1 for non-periodic graphs and padding, so division is safe)."""
        det = jnp.abs(jnp.linalg.det(self.cell))
        periodic = jnp.any(self.pbc, axis=-1) & self.graph_mask
        return jnp.where(periodic & (det > 0), det, 1.0)


def edge_vectors(
    graph: Graph,
    positions: jax.Array | None = None,
    strain: jax.Array | None = None,
    pad_length: float = 10.0,
) -> jax.Array:
    """[n_edge, 3] edge vectors D = r_j - r_i + S @ cell, optionally under a homogeneous strain.

    `strain` [n_graph, 3, 3] deforms positions and cell by (I + sym(strain)); the stress is then
    (1/V) dE/dstrain at strain = 0. Padding edges get a fixed vector of length `pad_length` (pick it
    beyond the model's cutoff): a zero vector would give NaN gradients through |D| even when masked.
    """
    pos = jnp.asarray(graph.positions if positions is None else positions)
    cell = jnp.asarray(graph.cell).astype(pos.dtype)
    if strain is not None:
        sym = 0.5 * (strain + jnp.swapaxes(strain, -1, -2))
        deform = jnp.eye(3, dtype=pos.dtype) + sym.astype(pos.dtype)
        pos = jnp.einsum("ni,nij->nj", pos, deform[graph.node_graph])
        cell = jnp.einsum("gij,gjk->gik", cell, deform)
    shift_vec = jnp.einsum("ei,eij->ej", graph.shifts.astype(pos.dtype), cell[graph.edge_graph])
    vec = pos[graph.senders] - pos[graph.receivers] + shift_vec
    pad = jnp.asarray([0.0, 0.0, pad_length], dtype=pos.dtype)
    return jnp.where(graph.edge_mask[:, None], vec, pad)


# ---------------------------------------------------------------------------------------------
# Padding policy: the one place static shapes are decided
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PaddingPolicy:
    """Round sizes up to a geometric ladder `round_up(multiple * growth**k, multiple)`.

    With growth 1.25 at most ~25% of a batch is padding, and batches of similar size share a shape,
    so `jit` compiles a few shapes per dataset instead of one per batch.
    """

    growth: float = 1.25
    node_multiple: int = 16
    edge_multiple: int = 128
    graph_multiple: int = 1

    def round(self, n: int, multiple: int) -> int:
        k = 0
        while True:
            v = int(math.ceil(multiple * self.growth**k / multiple) * multiple)
            if v >= n:
                return v
            k += 1

    def sizes(
        self, n_node: int, n_edge: int, n_graph: int, edges_per_node: float | None = None
    ) -> tuple[int, int, int]:
        """Padded (nodes, edges, graphs) for real totals; always leaves a padding node and graph.

        With `edges_per_node` (a bound on edges / atoms over a dataset) the edge size follows the node
        size, so a dataset compiles one shape per node bucket instead of one per (node, edge) pair.
        """
        nodes = self.round(n_node + 1, self.node_multiple)
        if edges_per_node is not None:
            edges = int(math.ceil(max(edges_per_node * nodes, n_edge, 1) / self.edge_multiple) * self.edge_multiple)
        else:
            edges = self.round(max(n_edge, 1), self.edge_multiple)
        return nodes, edges, self.round(n_graph + 1, self.graph_multiple)


DEFAULT_POLICY = PaddingPolicy()


# ---------------------------------------------------------------------------------------------
# Frames + neighbour lists -> padded graphs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class FrameGraphs:
    """Frames with their neighbour lists at one cutoff (host-side numpy, computed once)."""

    frames: Frames
    cutoff: float
    edge_offsets: np.ndarray  # [F+1]
    receivers: np.ndarray  # [E] local atom indices
    senders: np.ndarray  # [E]
    shifts: np.ndarray  # [E, 3] int32

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def n_edges(self) -> np.ndarray:
        return np.diff(self.edge_offsets)

    @property
    def edges_per_node(self) -> float:
        """Largest edges / atoms ratio of any frame: bounds the edges of any batch by its atoms."""
        return float(np.max(self.n_edges / np.maximum(self.frames.n_atoms, 1))) if len(self) else 0.0

    def batch(
        self, indices: Sequence[int], policy: PaddingPolicy = DEFAULT_POLICY, sizes=None, n_graph: int | None = None
    ) -> Graph:
        """One padded batch. Sizes come from `policy` (edges bounded by `edges_per_node`) unless
        `sizes` fixes them; `n_graph` reserves room for that many graphs (for a short last batch)."""
        if sizes is None:
            idx = np.asarray(indices, dtype=np.int64)
            n_graph = max(len(idx), n_graph or 0)
            sizes = policy.sizes(
                _as_full(int(self.frames.n_atoms[idx].sum()), len(idx), n_graph),
                _as_full(int(self.n_edges[idx].sum()), len(idx), n_graph),
                n_graph,
                edges_per_node=self.edges_per_node,
            )
        return batch_graph(self, indices, policy=policy, sizes=sizes)

    def sharded_batch(
        self, indices: Sequence[int], n_shards: int, policy: PaddingPolicy = DEFAULT_POLICY, n_graph: int | None = None
    ) -> Graph:
        """The frames `indices` split into `n_shards` consecutive parts (sizes differ by one at most), each
        padded like `batch` to the largest part's sizes, stacked on a leading shard axis (data-parallel
        training: one part per device). `n_graph` (the full batch size) reserves room for a short last batch."""
        idx = np.asarray(indices, dtype=np.int64)
        parts = np.array_split(idx, n_shards)
        per = -(-max(len(idx), n_graph or 0) // n_shards)
        sizes = [
            policy.sizes(_as_full(int(self.frames.n_atoms[q].sum()), len(q), per),
                         _as_full(int(self.n_edges[q].sum()), len(q), per), per, edges_per_node=self.edges_per_node)
            for q in parts
        ]
        common = tuple(max(sz[k] for sz in sizes) for k in range(3))
        graphs = [batch_graph(self, q, policy=policy, sizes=common) for q in parts]
        return jax.tree.map(lambda *xs: np.stack(xs), *graphs)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        policy: PaddingPolicy = DEFAULT_POLICY,
    ) -> Iterator[Graph]:
        """Padded batches over all frames; shuffled by a seeded permutation when `shuffle`."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self.batch(order[start : start + batch_size], policy=policy, n_graph=batch_size)

    def max_sizes(self, batch_size: int, policy: PaddingPolicy = DEFAULT_POLICY) -> tuple[int, int, int]:
        """One padded shape that holds any batch of `batch_size` frames (worst case: the largest)."""
        nodes = np.sort(self.frames.n_atoms)[::-1][:batch_size].sum()
        edges = np.sort(self.n_edges)[::-1][:batch_size].sum()
        return policy.sizes(int(nodes), int(edges), batch_size, edges_per_node=self.edges_per_node)


def _as_full(total: int, k: int, n_graph: int) -> int:
    """A short batch's total (atoms or edges of ``k`` frames) scaled to ``n_graph`` frames: padded like a
    full batch, a short last batch has the full batches' shape (one compilation less per training run when
    the frames are of one size) and its shape depends on the data alone (resumed runs pick the same)."""
    return -(-total * n_graph // k) if 0 < k < n_graph else total


def build_graphs(frames: Frames, cutoff: float, progress: bool = False) -> FrameGraphs:
    """Neighbour lists (pairs within `cutoff`, all periodic images) for every frame."""
    from .neighbors import neighbor_pairs

    recv, send, shifts, counts = [], [], [], [0]
    it = range(len(frames))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"neighbours (r < {cutoff} Å)", leave=False)
    off = frames.offsets
    for f in it:
        pos = frames.positions[off[f] : off[f + 1]]
        i, j, s, _ = neighbor_pairs(pos, frames.cell[f], frames.pbc[f], cutoff)
        recv.append(i.astype(np.int32))
        send.append(j.astype(np.int32))
        shifts.append(s.astype(np.int32))
        counts.append(len(i))
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape, np.int32)  # noqa: E731
    return FrameGraphs(
        frames=frames,
        cutoff=float(cutoff),
        edge_offsets=np.cumsum(counts).astype(np.int64),
        receivers=cat(recv, (0,)),
        senders=cat(send, (0,)),
        shifts=cat(shifts, (0, 3)).reshape(-1, 3),
    )


def batch_graph(fg: FrameGraphs, indices: Sequence[int], policy: PaddingPolicy = DEFAULT_POLICY, sizes=None) -> Graph:
    """Pack the frames `indices` into one padded `Graph` (numpy arrays; jit accepts them as is)."""
    fr = fg.frames
    idx = np.asarray(indices, dtype=np.int64)
    G = len(idx)
    natoms = fr.n_atoms[idx]
    nedges = fg.n_edges[idx]
    n_real, e_real = int(natoms.sum()), int(nedges.sum())
    N, E, Gp = sizes if sizes is not None else policy.sizes(n_real, e_real, G)
    if N < n_real + 1 or E < e_real or Gp < G + 1:
        raise ValueError(f"padded sizes {(N, E, Gp)} too small for {(n_real + 1, e_real, G + 1)} (nodes, edges, graphs)")
    aoff, eoff = fr.offsets, fg.edge_offsets
    atom_idx = np.concatenate([np.arange(aoff[f], aoff[f + 1]) for f in idx]) if G else np.zeros(0, np.int64)
    edge_idx = np.concatenate([np.arange(eoff[f], eoff[f + 1]) for f in idx]) if G else np.zeros(0, np.int64)
    node_start = np.concatenate([[0], np.cumsum(natoms)[:-1]]) if G else np.zeros(0, np.int64)
    edge_node_base = np.repeat(node_start, nedges)

    positions = np.zeros((N, 3))
    positions[:n_real] = fr.positions[atom_idx]
    species = np.zeros(N, np.int32)
    species[:n_real] = fr.numbers[atom_idx]
    node_graph = np.full(N, Gp - 1, np.int32)
    node_graph[:n_real] = np.repeat(np.arange(G), natoms)
    senders = np.full(E, n_real, np.int32)
    receivers = np.full(E, n_real, np.int32)
    senders[:e_real] = fg.senders[edge_idx] + edge_node_base
    receivers[:e_real] = fg.receivers[edge_idx] + edge_node_base
    shifts = np.zeros((E, 3))
    shifts[:e_real] = fg.shifts[edge_idx]
    cell = np.zeros((Gp, 3, 3))
    cell[:G] = fr.cell[idx]
    pbc = np.zeros((Gp, 3), bool)
    pbc[:G] = fr.pbc[idx]
    n_node = np.zeros(Gp, np.int32)
    n_node[:G] = natoms
    n_node[-1] = N - n_real
    n_edge = np.zeros(Gp, np.int32)
    n_edge[:G] = nedges
    n_edge[-1] = E - e_real
    graph_mask = np.arange(Gp) < G

    energy = np.zeros(Gp)
    forces = np.zeros((N, 3))
    stress = np.zeros((Gp, 3, 3))
    has_e, has_f, has_s = (np.zeros(Gp, bool) for _ in range(3))
    if fr.energy is not None:
        energy[:G] = fr.energy[idx]
        has_e[:G] = True
    if fr.forces is not None:
        forces[:n_real] = fr.forces[atom_idx]
        has_f[:G] = True
    if fr.stress is not None:
        has_s[:G] = fr.has_stress[idx]
        stress[:G] = np.where(has_s[:G, None, None], fr.stress[idx], 0.0)
    return Graph(
        positions=positions,
        species=species,
        cell=cell,
        pbc=pbc,
        senders=senders,
        receivers=receivers,
        shifts=shifts,
        node_graph=node_graph,
        n_node=n_node,
        n_edge=n_edge,
        node_mask=np.arange(N) < n_real,
        edge_mask=np.arange(E) < e_real,
        graph_mask=graph_mask,
        energy=energy,
        forces=forces,
        stress=stress,
        has_energy=has_e,
        has_forces=has_f,
        has_stress=has_s,
    )


def graph_from_frames(frames: Frames, cutoff: float, indices=None, policy: PaddingPolicy = DEFAULT_POLICY) -> Graph:
    """Convenience: neighbour lists + one padded batch of `frames` (all of them by default)."""
    idx = np.arange(len(frames)) if indices is None else np.asarray(indices)
    fg = build_graphs(frames[idx], cutoff)
    return fg.batch(np.arange(len(idx)), policy=policy)


def graph_from_atoms(atoms, cutoff: float, policy: PaddingPolicy = DEFAULT_POLICY) -> Graph:
    """One `ase.Atoms` (or a list of them) as a padded `Graph`."""
    from .io import frames_from_atoms

    atoms_list = atoms if isinstance(atoms, (list, tuple)) else [atoms]
    return graph_from_frames(frames_from_atoms(atoms_list), cutoff, policy=policy)


def md_graph(positions, species, cell, pbc, neighbors, select=None) -> Graph:
    """A single-structure `Graph` around an MD neighbour list (jittable; shapes fixed by the list).

    `neighbors` comes from `jaxbench.neighbors.md_neighbor_list`; its padding index is N (one past
    the last atom), so the graph gets exactly one padding node at N and one padding graph. `select`:
    (positions, cell) in the frame the list was built in, when that is not this one (NPT: the start
    cell); which stored pairs become edges is decided there, as the list's own overflow check did.
    """
    positions = jnp.asarray(positions)
    n = positions.shape[0]
    dtype = positions.dtype
    pos = jnp.concatenate([positions, jnp.zeros((1, 3), dtype)], axis=0)
    species = jnp.concatenate([jnp.asarray(species, jnp.int32), jnp.zeros((1,), jnp.int32)])
    cell = jnp.stack([jnp.asarray(cell, dtype), jnp.zeros((3, 3), dtype)])
    pbc = jnp.stack([jnp.asarray(pbc, bool), jnp.zeros(3, bool)])
    if neighbors.edge_capacity:  # only the pairs within the cutoff (see neighbors.md_neighbor_list)
        from .neighbors import edges_within_cutoff

        sel_pos, sel_cell = (positions, cell[0]) if select is None else select
        senders, receivers, shifts, mask = edges_within_cutoff(sel_pos, neighbors, sel_cell)
    else:
        senders, receivers, shifts, mask = neighbors.senders, neighbors.receivers, neighbors.shifts, neighbors.mask
    e = mask.shape[0]
    n_real_edges = jnp.sum(mask).astype(jnp.int32)
    return Graph(
        positions=pos,
        species=species,
        cell=cell,
        pbc=pbc,
        senders=jnp.where(mask, senders, n).astype(jnp.int32),
        receivers=jnp.where(mask, receivers, n).astype(jnp.int32),
        shifts=jnp.where(mask[:, None], shifts, 0).astype(dtype),
        node_graph=jnp.concatenate([jnp.zeros(n, jnp.int32), jnp.ones(1, jnp.int32)]),
        n_node=jnp.asarray([n, 1], jnp.int32),
        n_edge=jnp.stack([n_real_edges, e - n_real_edges]),
        node_mask=jnp.arange(n + 1) < n,
        edge_mask=mask,
        graph_mask=jnp.asarray([True, False]),
        energy=jnp.zeros(2, dtype),
        forces=jnp.zeros((n + 1, 3), dtype),
        stress=jnp.zeros((2, 3, 3), dtype),
        has_energy=jnp.zeros(2, bool),
        has_forces=jnp.zeros(2, bool),
        has_stress=jnp.zeros(2, bool),
    )
