"""Correctness tests shared by every architecture (float64), run on each model's small card.

A new model gets all of these by adding its card: symmetries, finite differences, cutoff smoothness,
extensivity, supercells, stress, batching.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jaxbench import data
from jaxbench.frames import Frames
from jaxbench.graph import build_graphs
from jaxbench.potential import Potential, model_cards
from jaxbench.stats import DatasetStatistics

from .conftest import requires_data

jax.config.update("jax_enable_x64", True)

SMALL_CARDS = sorted(n for n, c in model_cards().items() if c.get("variant_of") and n.endswith("-small"))
SPECIES = (1, 3, 6, 8, 15, 16)  # H, Li, C, O, P, S: MD17 molecules and LiPS

pytestmark = [requires_data, pytest.mark.skipif(not SMALL_CARDS, reason="no model cards yet")]


def statistics(r_max: float) -> DatasetStatistics:
    # Non-trivial scale / shift / E0 so that the wrapper's arithmetic is exercised too.
    return DatasetStatistics(
        species=SPECIES,
        atomic_energies={1: -13.6, 3: -7.5, 6: -1029.3, 8: -2042.0, 15: -1537.1, 16: -1867.8},
        energy_per_atom_mean=0.05,
        energy_per_atom_std=0.02,
        force_rms=1.3,
        avg_num_neighbors=12.0,
        cutoff=r_max,
        n_frames=1,
    )


@functools.lru_cache(maxsize=None)
def potential_and_params(card_name: str):
    card = model_cards()[card_name]
    pot = Potential.from_card(card, statistics(float(card["hyperparameters"]["r_max"])))
    g = build_graphs(ethanol_and_lips()[0:1], pot.r_max).batch([0])
    params = pot.init(jax.random.PRNGKey(0), g, dtype=jnp.float64)
    # Random, non-zero weights everywhere (some architectures zero-initialise their output layers,
    # which would make every symmetry test pass trivially).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return pot, jax.tree.unflatten(tree, leaves)


@functools.lru_cache(maxsize=None)
def ethanol_and_lips() -> Frames:
    eth = data.load("md17-ethanol", "test")[:2]
    lips = data.load("lips", "test")[:1]
    return Frames.concatenate([eth, lips])


_JITTED: dict[int, object] = {}
SMALL_SIZES = (160, 4096, 5)  # padded nodes, edges, graphs


def evaluate(pot, params, frames: Frames, stress=False):
    # One jitted function per potential: repeated calls on same-shaped graphs reuse the compilation.
    fn = _JITTED.setdefault(id(pot), jax.jit(pot.__call__, static_argnums=2))
    fg = build_graphs(frames, pot.r_max)
    # One padded shape for every small test system, so each model compiles a few times, not once per
    # system (compilation dominates these tests); the 2x2x2 supercell gets its own shape.
    fits = frames.n_atoms.sum() < SMALL_SIZES[0] and fg.n_edges.sum() <= SMALL_SIZES[1] and len(frames) < SMALL_SIZES[2]
    g = fg.batch(np.arange(len(frames)), sizes=SMALL_SIZES if fits else None)
    out = fn(params, g, stress)
    n = frames.n_atoms.sum()
    res = {"energy": np.asarray(out["energy"])[: len(frames)], "forces": np.asarray(out["forces"])[:n]}
    if stress:
        res["stress"] = np.asarray(out["stress"])[: len(frames)]
    return res


def transformed(frames: Frames, R: np.ndarray, t: np.ndarray) -> Frames:
    return frames.replace(positions=frames.positions @ R.T + t, cell=frames.cell @ R.T)


@pytest.mark.parametrize("card", SMALL_CARDS)
def test_invariance_and_equivariance(card):
    pot, params = potential_and_params(card)
    fr = ethanol_and_lips()
    ref = evaluate(pot, params, fr)
    assert np.abs(ref["forces"]).max() > 1e-3, "forces vanish: the test would be trivial"
    assert abs(ref["energy"][0] - ref["energy"][1]) > 1e-8, "energy ignores the geometry"
    rng = np.random.default_rng(0)
    for reflect in (False, True):
        R = Rotation.random(random_state=rng).as_matrix()
        if reflect:
            R = R @ np.diag([1.0, 1.0, -1.0])
        t = rng.normal(size=3) * 3.0
        out = evaluate(pot, params, transformed(fr, R, t))
        np.testing.assert_allclose(out["energy"], ref["energy"], rtol=0, atol=1e-8)  # eV
        scale = np.abs(ref["forces"]).max()
        assert np.abs(out["forces"] - ref["forces"] @ R.T).max() < 1e-6 * scale
    # Permutation of the atoms within the molecule.
    perm = rng.permutation(9)
    one = fr[[0]]
    permuted = one.replace(positions=one.positions[perm], numbers=one.numbers[perm], forces=one.forces[perm])
    a, b = evaluate(pot, params, one), evaluate(pot, params, permuted)
    np.testing.assert_allclose(b["energy"], a["energy"], rtol=1e-12)
    np.testing.assert_allclose(b["forces"], a["forces"][perm], atol=1e-9 * scale)


@pytest.mark.parametrize("card", SMALL_CARDS)
def test_forces_are_finite_differences(card):
    pot, params = potential_and_params(card)
    fr = ethanol_and_lips()
    for f in (0, 2):  # a molecule and a triclinic crystal
        one = fr[[f]]
        forces = evaluate(pot, params, one)["forces"]
        rng = np.random.default_rng(f)
        h = 1e-4
        for atom in rng.choice(len(one.positions), 3, replace=False):
            for k in range(3):
                plus, minus = one.positions.copy(), one.positions.copy()
                plus[atom, k] += h
                minus[atom, k] -= h
                ep = evaluate(pot, params, one.replace(positions=plus))["energy"][0]
                em = evaluate(pot, params, one.replace(positions=minus))["energy"][0]
                fd = -(ep - em) / (2 * h)
                assert abs(fd - forces[atom, k]) < 1e-5 * max(1.0, abs(forces[atom, k])), (f, atom, k)


@pytest.mark.parametrize("card", SMALL_CARDS)
def test_energy_smooth_across_cutoff(card):
    pot, params = potential_and_params(card)
    r_max = pot.r_max
    # A C-O pair plus an H atom that moves across r_max from the O atom.
    d = np.linspace(r_max - 0.05, r_max + 0.05, 41)
    energies, forces = [], []
    for x in d:
        pos = np.array([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [1.2 + x, 0.3, 0.0]])
        fr = Frames.from_arrays(pos[None], [6, 8, 1])
        out = evaluate(pot, params, fr)
        energies.append(out["energy"][0])
        forces.append(out["forces"][2])
    energies, forces = np.array(energies), np.array(forces)
    step = np.abs(np.diff(energies))
    # No jump: consecutive differences shrink smoothly; beyond r_max nothing changes at all.
    assert step.max() < 50 * np.median(step[:15]) + 1e-12
    np.testing.assert_allclose(energies[d > r_max], energies[-1], rtol=0, atol=1e-12)
    assert np.all(np.isfinite(forces)) and np.abs(forces).max() < 1e3
    np.testing.assert_allclose(forces[d > r_max], 0.0, atol=1e-12)


@pytest.mark.parametrize("card", SMALL_CARDS)
def test_extensivity_and_supercell(card):
    pot, params = potential_and_params(card)
    fr = ethanol_and_lips()
    mol = fr[[0]]
    pos = mol.positions
    two = Frames.from_arrays(np.concatenate([pos, pos + [20.0, 0.0, 0.0]])[None], np.concatenate([mol.numbers] * 2))
    e1, e2 = evaluate(pot, params, mol)["energy"][0], evaluate(pot, params, two)["energy"][0]
    np.testing.assert_allclose(e2, 2 * e1, rtol=1e-10)
    lips = fr[[2]].to_ase(0)
    sc = lips.repeat((2, 2, 2))
    from jaxbench.io import frames_from_atoms

    a = evaluate(pot, params, fr[[2]])
    b = evaluate(pot, params, frames_from_atoms(sc, validate=False))
    np.testing.assert_allclose(b["energy"][0], 8 * a["energy"][0], rtol=1e-10)
    np.testing.assert_allclose(b["forces"][: len(lips)], a["forces"], atol=1e-8)


@pytest.mark.parametrize("card", SMALL_CARDS)
def test_stress_is_strain_derivative(card):
    pot, params = potential_and_params(card)
    lips = ethanol_and_lips()[[2]]
    stress = evaluate(pot, params, lips, stress=True)["stress"][0]
    assert np.abs(stress).max() > 1e-6
    V = abs(np.linalg.det(lips.cell[0]))
    h = 1e-5
    for a, b in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
        eps = np.zeros((3, 3))
        eps[a, b] = eps[b, a] = h / (1 if a == b else 2)
        es = []
        for sign in (1, -1):
            D = np.eye(3) + sign * eps
            es.append(evaluate(pot, params, lips.replace(positions=lips.positions @ D, cell=lips.cell @ D))["energy"][0])
        fd = (es[0] - es[1]) / (2 * h) / V
        assert abs(fd - stress[a, b]) < 1e-5 * max(1e-3, np.abs(stress).max()), (a, b, fd, stress[a, b])


@pytest.mark.parametrize("card", SMALL_CARDS)
def test_batched_equals_one_by_one(card):
    pot, params = potential_and_params(card)
    fr = Frames.concatenate([ethanol_and_lips(), data.load("lips20-P2S5", "test")[:1]])
    batched = evaluate(pot, params, fr, stress=True)
    off = fr.offsets
    for f in range(len(fr)):
        one = evaluate(pot, params, fr[[f]], stress=True)
        np.testing.assert_allclose(batched["energy"][f], one["energy"][0], rtol=1e-11)
        np.testing.assert_allclose(batched["forces"][off[f] : off[f + 1]], one["forces"], atol=1e-9)
        np.testing.assert_allclose(batched["stress"][f], one["stress"][0], atol=1e-10)


# float32 is the training and bench default for every card; the default suite checks the two cards the
# quickstart and the tests train most (every card: -m slow)
@pytest.mark.parametrize("card", [c if c in ("mace-small", "allegro-small") else pytest.param(c, marks=pytest.mark.slow)
                                  for c in SMALL_CARDS])
def test_float32_close_to_float64(card):
    pot, params64 = potential_and_params(card)
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params64)
    fr = ethanol_and_lips()
    g = build_graphs(fr, pot.r_max).batch(np.arange(len(fr)), sizes=SMALL_SIZES)
    fn = _JITTED.setdefault(id(pot), jax.jit(pot.__call__, static_argnums=2))
    o64 = fn(params64, g, False)
    o32 = fn(params32, g.replace(positions=g.positions.astype(np.float32)), False)
    assert o32["forces"].dtype == jnp.float32
    n = fr.n_atoms.sum()
    f64, f32 = np.asarray(o64["forces"])[:n], np.asarray(o32["forces"])[:n]
    assert np.abs(f32 - f64).max() < 1e-3 * np.abs(f64).max()
