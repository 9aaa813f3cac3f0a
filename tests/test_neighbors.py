"""Neighbor lists: static (numpy) against ASE, jittable MD list against the static one."""

from __future__ import annotations

import os
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.neighborlist import neighbor_list as ase_neighbor_list  # noqa: E402

from jaxbench.errors import NeighborListError  # noqa: E402
from jaxbench.neighbors import (  # noqa: E402
    Neighbors,
    cell_heights,
    check_overflow,
    choose_method,
    md_neighbor_list,
    neighbor_pairs,
    neighbors_to_numpy,
)


def _data_dir() -> Path | None:
    env = os.environ.get("JAXBENCH_DATA_MIRROR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared/data/egraffbench")
    for p in candidates:
        if (p / "Datasets").is_dir():
            return p
    return None


DATA = _data_dir()
LIPS20 = sorted(DATA.glob("Datasets/All_LiPS20/*/3000K/deepmd/*/")) if DATA else []
CUTOFFS = (5.0, 6.0)


def need_data():
    if DATA is None:
        pytest.skip("reference data not found: set JAXBENCH_DATA_MIRROR or provide ../shared/data/egraffbench")


def load_lips20(d: Path):
    cell = np.load(d / "set.000/box.npy")[0].reshape(3, 3)
    pos = np.load(d / "set.000/coord.npy")[0].reshape(-1, 3)
    types = np.loadtxt(d / "type.raw", dtype=int).reshape(-1)
    assert len(types) == len(pos)
    return pos, cell, np.ones(3, bool)


def load_npz(rel: str):
    z = np.load(DATA / rel)
    return z["pos"][0], np.asarray(z["cell"]).reshape(3, 3), np.asarray(z["pbc"], bool).reshape(3)


def lips():
    need_data()
    return load_npz("Datasets/Data_lips/data/val/nequip_npz.npz")


def p2s5():
    need_data()
    return load_lips20(DATA / "Datasets/All_LiPS20/P2S5/3000K/deepmd/Li0P8S20")


TINY = {
    "cubic_3.1": (np.array([[0.0, 0.0, 0.0], [1.5, 1.4, 1.3]]), np.eye(3) * 3.1),
    "triclinic_small": (
        np.array([[0.2, 0.0, 0.1], [1.5, 1.4, 1.3]]),
        np.array([[3.1, 0.0, 0.0], [1.9, 2.8, 0.0], [-1.2, 0.7, 2.9]]),
    ),
}


def pair_set(i, j, s):
    return set(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), map(tuple, np.asarray(s).tolist())))


def assert_matches_ase(positions, cell, pbc, cutoff):
    atoms = Atoms(positions=positions, cell=cell, pbc=pbc)
    ai, aj, aS, ad = ase_neighbor_list("ijSd", atoms, cutoff)
    i, j, s, d = neighbor_pairs(positions, cell, pbc, cutoff)
    assert i.dtype == np.int64 and j.dtype == np.int64 and s.dtype == np.int32 and d.dtype == np.float64
    assert s.shape == (len(i), 3) and d.shape == (len(i),)
    assert pair_set(i, j, s) == pair_set(ai, aj, aS)
    assert len(i) == len(ai)  # no duplicates
    order = np.lexsort((aS[:, 2], aS[:, 1], aS[:, 0], aj, ai))
    np.testing.assert_array_equal(i, ai[order])
    np.testing.assert_array_equal(j, aj[order])
    np.testing.assert_array_equal(s, aS[order])
    np.testing.assert_allclose(d, ad[order], atol=1e-5, rtol=0)
    # the distances are those of the convention D = R[j] - R[i] + S @ cell
    vec = positions[j] - positions[i] + s @ np.asarray(cell).reshape(3, 3)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), d, atol=1e-9)
    assert not np.any((i == j) & np.all(s == 0, axis=1))
    return i, j, s, d


# ------------------------------------------------------------------ static list vs ASE


@pytest.mark.parametrize("cutoff", CUTOFFS)
def test_static_lips20_vs_ase(cutoff):
    need_data()
    assert len(LIPS20) == 16, [str(p) for p in LIPS20]
    for d in LIPS20:
        assert_matches_ase(*load_lips20(d), cutoff)


@pytest.mark.parametrize("cutoff", CUTOFFS)
@pytest.mark.parametrize(
    "rel", ["Datasets/Data_lips/data/val/nequip_npz.npz", "Datasets/GeTe/data/test/nequip_npz.npz"]
)
def test_static_npz_vs_ase(rel, cutoff):
    need_data()
    assert_matches_ase(*load_npz(rel), cutoff)


@pytest.mark.parametrize("cutoff", CUTOFFS)
@pytest.mark.parametrize("name", sorted(TINY))
def test_static_cell_smaller_than_cutoff(name, cutoff):
    pos, cell = TINY[name]
    assert cell_heights(cell).max() < cutoff  # several images along every axis
    i, j, s, _ = assert_matches_ase(pos, cell, np.ones(3, bool), cutoff)
    assert np.any((i == j) & np.any(s != 0, axis=1))  # self-images present


def test_static_single_atom_cell():
    assert_matches_ase(np.array([[0.3, 0.2, 0.1]]), np.eye(3) * 2.5, np.ones(3, bool), 5.0)


def test_static_unwrapped_positions():
    pos, cell, pbc = lips()
    rng = np.random.default_rng(1)
    unwrapped = pos + rng.integers(-3, 4, size=pos.shape) @ cell + rng.normal(size=pos.shape) * 0.3
    i, j, s, d = assert_matches_ase(unwrapped, cell, pbc, 5.0)
    # same geometry as the wrapped copy: identical (i, j) multiset and distances
    wrapped = Atoms(positions=unwrapped, cell=cell, pbc=pbc)
    wrapped.wrap()
    wi, wj, ws, wd = neighbor_pairs(wrapped.positions, cell, pbc, 5.0)
    np.testing.assert_array_equal(np.sort(i * 1000 + j), np.sort(wi * 1000 + wj))
    np.testing.assert_allclose(np.sort(d), np.sort(wd), atol=1e-9)
    # tiny cell, far outside
    tpos, tcell = TINY["triclinic_small"]
    assert_matches_ase(tpos + np.array([[7, -5, 2], [-4, 9, -11]]) @ tcell, tcell, np.ones(3, bool), 6.0)


def test_static_mixed_pbc():
    rng = np.random.default_rng(2)
    cell = np.array([[4.0, 0.0, 0.0], [1.0, 5.0, 0.0], [0.5, 0.3, 20.0]])
    pos = rng.uniform(-3.0, 8.0, size=(40, 3))
    for pbc in ([True, True, False], [False, True, False], [True, False, True]):
        assert_matches_ase(pos, cell, np.array(pbc), 6.0)


def test_static_molecule_no_pbc():
    rng = np.random.default_rng(3)
    pos = rng.uniform(0.0, 8.0, size=(40, 3))
    assert_matches_ase(pos, np.zeros((3, 3)), np.zeros(3, bool), 3.0)
    i, j, s, d = neighbor_pairs(pos, None, False, 3.0)
    assert np.all(s == 0)
    # cutoff below every distance: empty, well-typed
    i, j, s, d = neighbor_pairs(pos, np.zeros((3, 3)), False, 1e-3)
    assert len(i) == 0 and s.shape == (0, 3)


def test_static_overlap_cutoff():
    pos, cell, pbc = lips()
    assert len(neighbor_pairs(pos, cell, pbc, 0.1)[0]) == 0
    dup = np.concatenate([pos, pos[:1] + [0.05, 0.0, 0.0] + cell[0]])
    i, j, s, d = neighbor_pairs(dup, cell, pbc, 0.1)
    assert pair_set(i, j, s) == {(0, len(pos), (-1, 0, 0)), (len(pos), 0, (1, 0, 0))}
    np.testing.assert_allclose(d, 0.05, atol=1e-12)


def test_static_input_validation():
    with pytest.raises(NeighborListError, match="nonsingular cell"):
        neighbor_pairs(np.zeros((2, 3)), np.zeros((3, 3)), True, 5.0)
    with pytest.raises(NeighborListError, match="nonsingular cell"):
        neighbor_pairs(np.zeros((2, 3)), [[1, 0, 0], [2, 0, 0], [0, 0, 1]], [True, False, False], 5.0)
    with pytest.raises(NeighborListError, match="shape"):
        neighbor_pairs(np.zeros((2, 2)), np.eye(3), True, 5.0)
    with pytest.raises(NeighborListError, match="non-finite"):
        neighbor_pairs(np.array([[0.0, np.nan, 0.0]]), np.eye(3), True, 5.0)
    with pytest.raises(NeighborListError, match="cutoff"):
        neighbor_pairs(np.zeros((2, 3)), np.eye(3), True, -1.0)


# ------------------------------------------------------------------ MD list


def stored_set(nbrs: Neighbors):
    return pair_set(*neighbors_to_numpy(nbrs))


def within(nbrs_arrays, positions, cell, cutoff):
    senders, receivers, shifts, mask = nbrs_arrays
    nb = Neighbors(senders, receivers, shifts, mask, False, positions, 0, 0, None, "multi_image")
    return neighbors_to_numpy(nb, positions, cell, cutoff)


_RUNNERS: dict = {}
_FNS: dict = {}


def md_fns(system: str, method=None, capacity_multiplier=1.25):
    """Shared NeighborListFns (cutoff 5, skin 0.5): each new jax-md list recompiles its internals."""
    key = (system, method, capacity_multiplier)
    if key not in _FNS:
        pos, cell, pbc = lips() if system == "lips" else p2s5()
        _FNS[key] = md_neighbor_list(
            cell, pbc, 5.0, skin=0.5, method=method, capacity_multiplier=capacity_multiplier
        )
    return _FNS[key]


def runner(fns):
    """One jitted scan per NeighborListFns: per-step neighbor arrays of a trajectory."""
    key = id(fns)
    if key not in _RUNNERS:

        @jax.jit
        def run(nbrs, traj):
            def body(n, r):
                n = fns.update(r, n)
                return n, (n.senders, n.receivers, n.shifts, n.mask)

            return jax.lax.scan(body, nbrs, traj)

        _RUNNERS[key] = (fns, run)
    return _RUNNERS[key][1]


def random_walk(pos, steps=200, sigma=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return pos + np.cumsum(rng.normal(size=(steps,) + pos.shape) * sigma, axis=0)


def check_trajectory(fns, pos, cell, pbc, cutoff, steps=200, sigma=0.05):
    nbrs = fns.allocate(pos)
    traj = random_walk(pos, steps, sigma)
    final, arrays = runner(fns)(nbrs, jnp.asarray(traj))
    arrays = [np.asarray(a) for a in arrays]
    assert not bool(final.did_overflow)
    n_builds = int(final.n_builds)
    assert 1 < n_builds < steps + 1  # rebuilt sometimes, not at every step
    for k in range(steps):
        got = within([a[k] for a in arrays], traj[k], cell, cutoff)
        ref = neighbor_pairs(traj[k], cell, pbc, cutoff)
        assert pair_set(*got[:3]) == pair_set(*ref[:3]), f"step {k}"
        assert len(got[0]) == len(ref[0]), f"step {k}: duplicate pairs"
        np.testing.assert_allclose(got[3], ref[3], atol=1e-9)
    return final


def test_md_padding_and_types():
    pos, cell, pbc = lips()
    fns = md_fns("lips")
    nbrs = fns.allocate(pos)
    n = len(pos)
    assert nbrs.senders.dtype == jnp.int32 and nbrs.receivers.dtype == jnp.int32
    assert nbrs.shifts.shape == (nbrs.capacity, 3) and nbrs.mask.dtype == jnp.bool_
    pad = ~np.asarray(nbrs.mask)
    assert pad.sum() > 0
    assert np.all(np.asarray(nbrs.senders)[pad] == n) and np.all(np.asarray(nbrs.receivers)[pad] == n)
    assert np.all(np.asarray(nbrs.shifts)[pad] == 0)
    assert not bool(nbrs.did_overflow)
    # D = R[senders] - R[receivers] + shifts @ cell in the positions' float dtype (a padding node appended)
    R = jnp.concatenate([jnp.asarray(pos), jnp.zeros((1, 3))])
    D = R[nbrs.senders] - R[nbrs.receivers] + nbrs.shifts.astype(R.dtype) @ jnp.asarray(cell)
    d = np.linalg.norm(np.asarray(D), axis=1)[~pad]
    assert np.all(d < 5.5) and d.dtype == np.float64
    check_overflow(nbrs)  # no error


def test_md_lips_jax_md_trajectory():
    pos, cell, pbc = lips()
    assert choose_method(cell, pbc, 5.0, 0.5) == "jax_md"
    fns = md_fns("lips")
    assert fns.method == "jax_md"
    # start unwrapped: whole-lattice translations of some atoms
    rng = np.random.default_rng(4)
    start = pos + rng.integers(-2, 3, size=pos.shape) @ cell
    check_trajectory(fns, start, cell, pbc, 5.0)


def test_md_p2s5_multi_image_trajectory():
    pos, cell, pbc = p2s5()
    fns = md_fns("p2s5")
    assert fns.method == "multi_image" and fns.n_images == (1, 1, 1)
    check_trajectory(fns, pos, cell, pbc, 5.0)


def test_md_methods_agree_on_lips():
    pos, cell, pbc = lips()
    sets = {}
    for method in ("jax_md", "multi_image"):
        fns = md_fns("lips", method=method if method == "multi_image" else None)
        assert fns.method == method
        nbrs = fns.allocate(pos)
        assert nbrs.method == method
        sets[method] = stored_set(nbrs)
    assert sets["jax_md"] == sets["multi_image"]
    ref = neighbor_pairs(pos, cell, pbc, 5.5)
    assert sets["jax_md"] == pair_set(*ref[:3])


def test_md_small_cell_and_mixed_pbc_and_molecule():
    # two atoms in a cell smaller than the cutoff: many self images
    tpos, tcell = TINY["triclinic_small"]
    fns = md_neighbor_list(tcell, True, 5.0, skin=0.5)
    assert fns.method == "multi_image" and min(fns.n_images) >= 2
    start = tpos + np.array([[3, 0, -1], [0, -2, 0]]) @ tcell
    nbrs = fns.allocate(start)
    ref = neighbor_pairs(start, tcell, True, 5.5)
    assert stored_set(nbrs) == pair_set(*ref[:3])
    check_trajectory(fns, start, tcell, np.ones(3, bool), 5.0, steps=100, sigma=0.2)
    # mixed pbc
    rng = np.random.default_rng(5)
    cell = np.array([[7.0, 0.0, 0.0], [1.0, 8.0, 0.0], [0.0, 0.0, 30.0]])
    pos = rng.uniform(-2.0, 9.0, size=(30, 3))
    pbc = np.array([True, True, False])
    fns = md_neighbor_list(cell, pbc, 4.0, skin=0.5)
    assert fns.method == "multi_image"
    assert stored_set(fns.allocate(pos)) == pair_set(*neighbor_pairs(pos, cell, pbc, 4.5)[:3])
    check_trajectory(fns, pos, cell, pbc, 4.0, steps=100, sigma=0.1)
    with pytest.raises(NeighborListError, match="all or no axes periodic"):
        md_neighbor_list(cell, pbc, 4.0, method="jax_md")
    # molecule: jax_md with free space, zero cell allowed
    mol = rng.uniform(0.0, 6.0, size=(20, 3))
    fns = md_neighbor_list(np.zeros((3, 3)), False, 3.0, skin=0.5)
    assert fns.method == "jax_md"
    nbrs = fns.allocate(mol)
    assert stored_set(nbrs) == pair_set(*neighbor_pairs(mol, None, False, 3.5)[:3])
    nbrs = jax.jit(fns.update)(jnp.asarray(mol + 1.0), nbrs)  # rigid translation: rebuild, same pairs
    assert int(nbrs.n_builds) == 2
    assert stored_set(nbrs) == pair_set(*neighbor_pairs(mol, None, False, 3.5)[:3])


@pytest.mark.parametrize("system", ["lips", "p2s5"])
def test_md_overflow_and_reallocate(system):
    pos, cell, pbc = lips() if system == "lips" else p2s5()
    fns = md_fns(system, capacity_multiplier=1.25 if system == "lips" else 1.1)
    assert fns.method == ("jax_md" if system == "lips" else "multi_image")
    # allocate on the data frame, then squeeze all atoms into the middle eighth of the cell
    centre = 0.5 * cell.sum(axis=0)
    dilute = pos
    dense = centre + 0.5 * (pos - centre)
    nbrs = fns.allocate(dilute)
    assert not bool(nbrs.did_overflow)
    update = jax.jit(fns.update)
    nbrs = update(jnp.asarray(dense), nbrs)
    assert len(neighbor_pairs(dense, cell, pbc, 5.5)[0]) > nbrs.capacity
    assert bool(nbrs.did_overflow)
    nbrs = update(jnp.asarray(dense + 1e-3), nbrs)  # sticky, even without a rebuild
    assert bool(nbrs.did_overflow)
    with pytest.raises(NeighborListError, match="overflowed"):
        check_overflow(nbrs)
    fresh = fns.allocate(dense)
    assert not bool(fresh.did_overflow) and fresh.capacity > nbrs.capacity
    assert stored_set(fresh) == pair_set(*neighbor_pairs(dense, cell, pbc, 5.5)[:3])


@pytest.mark.parametrize("system", ["lips", "p2s5"])
def test_md_edge_compaction_gives_exactly_the_pairs_within_cutoff(system):
    """compact_edges: the model's edges (md_graph) along a random walk are exactly the pairs within the
    cutoff (not cutoff + skin), in fewer slots than the list; a frame with more pairs within the
    cutoff than edge_capacity (but still fitting the list) sets did_overflow, with or without a rebuild."""
    from jaxbench.graph import md_graph

    pos, cell, pbc = lips() if system == "lips" else p2s5()
    fns = md_neighbor_list(cell, pbc, 5.0, skin=0.5, capacity_multiplier=1.05, compact_edges=True)
    nbrs = fns.allocate(pos)
    n_cut = len(neighbor_pairs(pos, cell, pbc, 5.0)[0])
    assert nbrs.cutoff == 5.0 and nbrs.edge_capacity == int(n_cut * 1.05) + int(np.ceil(len(pos) * 0.05)) < nbrs.capacity
    traj = random_walk(pos, 40, 0.02)

    @jax.jit
    def run(nbrs, traj):
        def body(n, r):
            g = md_graph(r, np.zeros(len(pos), np.int32), cell, pbc, n)
            n = fns.update(r, n)
            return n, (g.senders, g.receivers, g.shifts.astype(jnp.int32), g.edge_mask)

        return jax.lax.scan(body, nbrs, traj)

    final, arrays = run(nbrs, jnp.asarray(traj))
    assert not bool(final.did_overflow) and int(final.n_builds) > 1
    assert arrays[0].shape[1] == nbrs.edge_capacity
    for k in range(len(traj)):
        m = np.asarray(arrays[3][k])
        i, j, s = (np.asarray(a[k])[m] for a in (arrays[1], arrays[0], arrays[2]))
        ref = neighbor_pairs(traj[k], cell, pbc, 5.0)
        assert len(i) == len(ref[0]) and pair_set(i, j, s) == pair_set(*ref[:3]), f"step {k}"
    # one slot fewer than the pairs within 5 Å of the last frame (all within the list's capacity):
    # an overflow of the model's edges alone, flagged by update (here with a rebuild) and by check
    import dataclasses

    n_last = len(neighbor_pairs(traj[-1], cell, pbc, 5.0)[0])
    for cap, overflows in ((n_last - 1, True), (n_last, False)):
        nb = dataclasses.replace(final, edge_capacity=cap)
        assert bool(jax.jit(fns.check)(jnp.asarray(traj[-1]), nb).did_overflow) == overflows
        stale = dataclasses.replace(nb, reference_positions=jnp.full_like(nb.reference_positions, jnp.inf))
        rebuilt = jax.jit(fns.update)(jnp.asarray(traj[-1]), stale)
        assert int(rebuilt.n_builds) == int(final.n_builds) + 1
        assert bool(rebuilt.did_overflow) == overflows and rebuilt.edge_capacity == cap


def test_md_impossible_case_clear_error():
    cell = np.diag([20.0, 20.0, 2.0])
    fns = md_neighbor_list(cell, True, 5.0, skin=0.5)  # 6 candidate shifts per pair (of 3 x 3 x 7)
    assert fns.method == "multi_image" and fns.n_images == (1, 1, 3)
    pos = np.random.default_rng(6).uniform(0.0, 1.0, size=(3000, 3)) @ cell
    with pytest.raises(NeighborListError) as err:
        fns.allocate(pos)  # 3000 * 3000 * 6 > 5e7: refused before any compute
    msg = str(err.value)
    for part in ("heights", "5.500", "Replicate", "smaller cutoff"):
        assert part in msg, msg
    with pytest.raises(NeighborListError, match="heights"):
        md_neighbor_list(cell, True, 5.0, n_atoms=3000)
    with pytest.raises(NeighborListError, match="minimum image"):
        md_neighbor_list(cell, True, 5.0, method="jax_md")
    with pytest.raises(NeighborListError, match="nonsingular"):
        md_neighbor_list(np.zeros((3, 3)), True, 5.0)


@pytest.mark.parametrize("system", ["lips", "p2s5"])
def test_md_float32_mode(system):
    """With x64 disabled both methods run in float32 and stay right along a trajectory."""
    pos, cell, pbc = lips() if system == "lips" else p2s5()
    with jax.enable_x64(False):
        fns = md_neighbor_list(cell, pbc, 5.0, skin=0.5)
        assert fns.method == ("jax_md" if system == "lips" else "multi_image")
        traj = random_walk(pos, 60, 0.05).astype(np.float32)
        nbrs = fns.allocate(traj[0])
        assert nbrs.reference_positions.dtype == jnp.float32
        final, arrays = runner(fns)(nbrs, jnp.asarray(traj))
        assert final.reference_positions.dtype == jnp.float32
        assert not bool(final.did_overflow) and int(final.n_builds) > 1
        arrays = [np.asarray(a) for a in arrays]
    for k in range(len(traj)):
        r = traj[k].astype(np.float64)
        got = within([a[k] for a in arrays], r, cell, 5.0)
        ref = neighbor_pairs(r, cell, pbc, 5.0)
        assert pair_set(*got[:3]) == pair_set(*ref[:3]), f"step {k}"
        assert len(got[0]) == len(ref[0]), f"step {k}: duplicate pairs"
