"""DimeNet++ specifics: in-module triplet construction against a brute-force NumPy enumeration, the
overflow policy, and the radial / spherical bases against scipy and closed forms (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import eval_legendre, spherical_jn

from jaxbench.frames import Frames
from jaxbench.graph import build_graphs, edge_vectors
from jaxbench.models import build_module
from jaxbench.models.dimenetpp import (
    bessel_normalizers,
    bessel_zeros,
    build_triplets,
    envelope,
    real_spherical_harmonics_m0,
    spherical_bessel,
)

jax.config.update("jax_enable_x64", True)


def brute_force_triplets(senders, receivers, shifts, edge_mask) -> set[tuple[int, int]]:
    """{(ji, kj)}: every real edge kj arriving at the sender j of a real edge ji, except the reverse of ji
    (k == i with opposite image shift). Uses the integer shifts, not the vectors the module sees."""
    out = set()
    real = np.flatnonzero(edge_mask)
    for ji in real:
        for kj in real:
            if receivers[kj] != senders[ji]:
                continue
            if senders[kj] == receivers[ji] and np.all(shifts[kj] + shifts[ji] == 0):
                continue
            out.add((int(ji), int(kj)))
    return out


def module_triplets(graph, r_max, max_neighbors):
    vectors = edge_vectors(graph, pad_length=2 * r_max)
    kj, mask, overflow = jax.jit(build_triplets, static_argnums=(4, 5))(
        vectors, graph.senders, graph.receivers, graph.edge_mask, graph.species.shape[0], max_neighbors
    )
    kj, mask = np.asarray(kj), np.asarray(mask)
    ji = np.broadcast_to(np.arange(kj.shape[0])[:, None], kj.shape)
    found = list(zip(ji[mask].tolist(), kj[mask].tolist()))
    assert len(found) == len(set(found)), "a triplet appears twice in the table"
    return set(found), bool(overflow), kj.shape[1]


def tiny_crystal() -> Frames:
    """3 atoms in a 3.1 Å triclinic cell at r_max = 5: every atom sees several images of every atom, so
    many triplets k -> j -> i have k == i through ANOTHER image (kept) besides the reverse edges (dropped)."""
    cell = np.array([[3.1, 0.0, 0.0], [0.4, 3.3, 0.0], [0.2, 0.5, 3.6]])
    frac = np.array([[0.0, 0.0, 0.0], [0.5, 0.4, 0.3], [0.2, 0.7, 0.8]])
    return Frames.from_arrays((frac @ cell)[None], [3, 15, 16], cell=cell, pbc=[True, True, True])


def molecules_and_crystal() -> Frames:
    pos = np.array([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [1.9, 1.0, 0.1], [-0.7, -0.9, 0.3], [3.0, 3.0, 3.0]])
    mol = Frames.from_arrays(pos[None], [6, 8, 1, 1, 1])  # the last H is within 5 Å of only some atoms
    return Frames.concatenate([mol, tiny_crystal(), mol.replace(positions=mol.positions * 1.3)])


@pytest.mark.parametrize("frames", [[0], [1], [0, 1, 2]])
def test_triplets_match_brute_force(frames):
    r_max = 5.0
    graph = build_graphs(molecules_and_crystal(), r_max).batch(frames)
    g = jax.tree.map(np.asarray, graph)
    expected = brute_force_triplets(g.senders, g.receivers, np.rint(g.shifts).astype(int), g.edge_mask)
    assert (~g.edge_mask).any(), "the batch has no padding edges: padding would go untested"
    found, overflow, K = module_triplets(graph, r_max, max_neighbors=64)
    assert not overflow
    assert found == expected
    if 1 in frames:  # image-aware exclusion matters here: a plain k != i rule would drop these
        through_images = [(ji, kj) for ji, kj in expected if g.senders[kj] == g.receivers[ji]]
        assert through_images, "the crystal has no k == i triplets through another image"


def test_triplet_table_width_and_overflow():
    r_max = 5.0
    graph = build_graphs(molecules_and_crystal(), r_max).batch([0, 1, 2])
    g = jax.tree.map(np.asarray, graph)
    real_receivers = g.receivers[g.edge_mask]
    max_in = np.bincount(real_receivers).max()
    # K exactly the largest in-degree: complete, no overflow.
    found, overflow, K = module_triplets(graph, r_max, max_neighbors=int(max_in))
    assert K == max_in and not overflow
    assert found == brute_force_triplets(g.senders, g.receivers, np.rint(g.shifts).astype(int), g.edge_mask)
    # One slot fewer: triplets would be missing, and the overflow flag says so.
    _, overflow, _ = module_triplets(graph, r_max, max_neighbors=int(max_in) - 1)
    assert overflow


def test_overflow_makes_energies_and_forces_nan():
    r_max = 5.0
    graph = build_graphs(tiny_crystal(), r_max).batch([0])
    g = jax.tree.map(np.asarray, graph)
    max_in = int(np.bincount(g.receivers[g.edge_mask]).max())
    hp = dict(r_max=r_max, hidden_channels=4, out_emb_channels=4, int_emb_size=2, basis_emb_size=2, num_blocks=1,
              num_radial=2, num_spherical=2, num_output_layers=1, output_initializer="glorot_orthogonal")
    species = jnp.zeros(g.node_mask.shape[0], jnp.int32)  # one species
    vectors = edge_vectors(graph, pad_length=2 * r_max)
    args = (species, g.senders, g.receivers, g.edge_mask, g.node_mask)
    ok = build_module("dimenetpp", 1, 10.0, dict(hp, max_neighbors=max_in))
    params = jax.jit(ok.init)(jax.random.PRNGKey(0), vectors, *args)

    def energy_and_grad(module):
        return jax.jit(jax.value_and_grad(lambda v: jnp.sum(module.apply(params, v, *args))))(vectors)

    e, dv = energy_and_grad(ok)
    assert np.isfinite(e) and np.all(np.isfinite(dv)) and np.abs(dv).max() > 0
    e, dv = energy_and_grad(build_module("dimenetpp", 1, 10.0, dict(hp, max_neighbors=max_in - 1)))
    assert np.isnan(e) and np.all(np.isnan(dv))


def test_spherical_bessel_against_scipy():
    x = np.concatenate([np.linspace(1e-8, 1.0, 500), np.linspace(1.0, 40.0, 2000)])
    for l in range(8):
        ref = spherical_jn(l, x)
        fn = jax.jit(lambda t: spherical_bessel(t, l))
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), ref, rtol=0, atol=1e-12)
        # float32: no catastrophic cancellation at small x (the closed forms lose everything there)
        got32 = np.asarray(fn(jnp.asarray(x, jnp.float32)), np.float64)
        assert np.abs(got32 - ref).max() < 1e-6, l
        grad = jax.jit(jax.vmap(jax.grad(lambda t: spherical_bessel(t, l))))(jnp.asarray(x))
        h = 1e-6
        fd = (spherical_jn(l, x[600:] + h) - spherical_jn(l, x[600:] - h)) / (2 * h)
        np.testing.assert_allclose(np.asarray(grad)[600:], fd, atol=1e-8)


def test_bessel_zeros_and_normalisation():
    z, norm = bessel_zeros(7, 6), bessel_normalizers(7, 6)
    assert np.all(np.diff(z, axis=1) > 0) and np.all(z[1:, 0] > z[:-1, 0])
    for l in range(7):
        np.testing.assert_allclose(spherical_jn(l, z[l]), 0.0, atol=1e-13)
        # j_l has no zero before z[l, 0]
        grid = np.linspace(1e-3, z[l, 0] - 1e-6, 2000)
        values = spherical_jn(l, grid)
        assert np.all(np.abs(values) > 0) and np.all(np.sign(values[1:]) == np.sign(values[:-1]))
    # orthonormal on [0, 1] with weight r^2: int N_ln N_lm j_l(z_ln r) j_l(z_lm r) r^2 dr = delta_nm
    r, w = np.polynomial.legendre.leggauss(200)
    r, w = 0.5 * (r + 1.0), 0.5 * w
    for l in (0, 3, 6):
        f = norm[l][:, None] * spherical_jn(l, z[l][:, None] * r[None])
        np.testing.assert_allclose((f * w * r**2) @ f.T, np.eye(6), atol=1e-10)


def test_spherical_harmonics_m0_against_legendre():
    cos = np.linspace(-1.0, 1.0, 101)
    got = np.asarray(real_spherical_harmonics_m0(jnp.asarray(cos), 7))
    for l in range(7):
        np.testing.assert_allclose(got[:, l], np.sqrt((2 * l + 1) / (4 * np.pi)) * eval_legendre(l, cos), atol=1e-13)


def test_envelope_smooth_at_cutoff():
    for exponent in (5, 6):
        p = exponent + 1
        u = lambda x: envelope(x, exponent)  # noqa: E731
        u, du, d2u = jax.jit(u), jax.jit(jax.grad(u)), jax.jit(jax.grad(jax.grad(u)))
        x = 0.3
        np.testing.assert_allclose(u(x), 1 / x - (p + 1) * (p + 2) / 2 * x ** (p - 1) + p * (p + 2) * x**p
                                   - p * (p + 1) / 2 * x ** (p + 1), rtol=1e-14)
        for f in (u, du, d2u):
            assert abs(float(f(1.0 - 1e-9))) < 1e-6
            assert float(f(1.0 + 1e-9)) == 0.0
