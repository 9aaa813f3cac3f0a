"""Metrics, each against an independent computation (ASE, NumPy by hand, closed forms)."""

from __future__ import annotations

import itertools
import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxbench import metrics as M  # noqa: E402
from jaxbench.neighbors import cell_heights  # noqa: E402

from .conftest import requires_data  # noqa: E402

# --------------------------------------------------------------------------------------------------
# helpers (independent NumPy implementations)
# --------------------------------------------------------------------------------------------------


def _numpy_rdf(positions, cell, numbers, r_max, dr, pair=None, extra=2):
    """Brute-force all-images RDF of one frame: shifts well beyond what is needed, no wrapping."""
    x = np.asarray(positions, float)
    cell = np.asarray(cell, float)
    h = cell_heights(cell)
    # positions are not wrapped here: allow for atoms up to one cell outside
    n = [math.ceil(r_max / hk) + extra for hk in h]
    rng = [range(-m, m + 1) for m in n]
    shifts = np.array(list(itertools.product(*rng)), float) @ cell
    numbers = np.asarray(numbers)
    N = len(x)
    if pair is None:
        ia, jb = np.arange(N), np.arange(N)
        na, nb = N, N
    else:
        ia, jb = np.nonzero(numbers == pair[0])[0], np.nonzero(numbers == pair[1])[0]
        na, nb = len(ia), len(jb)
    d = x[jb][None, :, None, :] - x[ia][:, None, None, :] + shifts[None, None]
    dist = np.linalg.norm(d, axis=-1).ravel()
    dist = dist[(dist > 1e-8) & (dist < r_max)]
    nbins = int(round(r_max / dr))
    edges = np.arange(nbins + 1) * dr
    counts, _ = np.histogram(dist, bins=edges)
    vol = abs(np.linalg.det(cell))
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    return counts / (na * nb / vol * shell)


def _triclinic_system(seed=0, n=3):
    rng = np.random.default_rng(seed)
    cell = np.array([[3.1, 0.0, 0.0], [1.2, 2.9, 0.0], [-0.7, 0.9, 3.3]])
    frac = rng.uniform(-0.5, 1.5, size=(2, n, 3))  # unwrapped on purpose
    numbers = np.array(([3, 16, 16, 3] * n)[:n])
    return frac @ cell, cell, numbers


# --------------------------------------------------------------------------------------------------
# RDF
# --------------------------------------------------------------------------------------------------


@requires_data
def test_rdf_matches_ase_on_lips(data_root):
    from ase.geometry.rdf import get_rdf

    from jaxbench import data

    fr = data.load("lips", "test")
    pos, cells, pbc, num = M.stack_frames(fr, indices=[0, 1])
    images = [fr.to_ase(0), fr.to_ase(1)]
    r_max, dr = 5.5, 0.05  # below half the smallest height (5.59 Å)
    g_ase, r_ase = get_rdf(images, r_max, 110)
    r, g = M.rdf(pos, cells, pbc, num, r_max, dr)
    np.testing.assert_allclose(np.asarray(r), r_ase, atol=1e-12)
    np.testing.assert_allclose(np.asarray(g), g_ase, atol=1e-6)
    assert float(np.max(g_ase)) > 1.0  # non-trivial
    # the all-images path (forced with n_images) agrees with the minimum-image fast path
    _, g_all = M.rdf(pos, cells, pbc, num, r_max, dr, n_images=(1, 1, 1))
    np.testing.assert_allclose(np.asarray(g_all), np.asarray(g), atol=1e-12)
    # true partials: ASE >= 3.27 computes them the same way (LAMMPS convention)
    pairs = M.species_pairs(num)
    _, gp = M.rdf(pos, cells, pbc, num, r_max, dr, pairs=pairs)
    for k, pr in enumerate(pairs):
        ga, _ = get_rdf(images, r_max, 110, elements=pr)
        np.testing.assert_allclose(np.asarray(gp[k]), ga, atol=1e-6, err_msg=str(pr))


def test_rdf_all_images_small_triclinic_cell():
    pos, cell, num = _triclinic_system(n=3)
    r_max, dr = 7.0, 0.1
    assert r_max > 2 * cell_heights(cell).max()  # far beyond half the cell
    r, g = M.rdf(pos, cell, True, num, r_max, dr)
    ref = np.mean([_numpy_rdf(p, cell, num, r_max, dr) for p in pos], axis=0)
    np.testing.assert_allclose(np.asarray(g), ref, atol=1e-6)
    for pr in [(3, 3), (3, 16), (16, 16)]:
        _, gp = M.rdf(pos, cell, True, num, r_max, dr, pairs=[pr])
        ref = np.mean([_numpy_rdf(p, cell, num, r_max, dr, pair=pr) for p in pos], axis=0)
        np.testing.assert_allclose(np.asarray(gp[0]), ref, atol=1e-6, err_msg=str(pr))


def test_rdf_two_atom_cell_and_mixed_pbc():
    cell = np.array([[2.0, 0.3, 0.0], [0.0, 2.5, 0.4], [0.2, 0.0, 3.0]])
    pos = np.array([[[0.1, 0.2, 0.3], [1.4, 1.1, 2.0]]])
    r_max, dr = 6.0, 0.25
    _, g = M.rdf(pos, cell, [True, True, True], [14, 14], r_max, dr)
    np.testing.assert_allclose(np.asarray(g), _numpy_rdf(pos[0], cell, [14, 14], r_max, dr), atol=1e-6)


@requires_data
def test_rdf_lips20_beyond_half_cell(data_root):
    from jaxbench import data

    fr = data.load("lips20", "crystal")
    pos, cells, pbc, num = M.stack_frames(fr, indices=[0])
    r_max, dr = 6.0, 0.05  # h_y = 8.22 Å: beyond half the cell along y
    _, g = M.rdf(pos, cells, pbc, num, r_max, dr)
    np.testing.assert_allclose(np.asarray(g), _numpy_rdf(pos[0], cells[0], num, r_max, dr, extra=1),
                               atol=1e-6)


def test_partials_sum_to_total():
    pos, cell, num = _triclinic_system(seed=3, n=5)
    r_max, dr = 5.0, 0.1
    _, g = M.rdf(pos, cell, True, num, r_max, dr)
    pairs = M.species_pairs(num)
    _, gp = M.rdf(pos, cell, True, num, r_max, dr, pairs="all")
    z, counts = np.unique(num, return_counts=True)
    c = dict(zip(z.tolist(), counts / counts.sum()))
    total = sum((1 if a == b else 2) * c[a] * c[b] * np.asarray(gp[k]) for k, (a, b) in enumerate(pairs))
    np.testing.assert_allclose(total, np.asarray(g), atol=1e-10)


def test_ideal_gas_rdf_is_flat():
    rng = np.random.default_rng(1)
    L, N, T = 10.0, 100, 20
    cell = np.eye(3) * L
    pos = rng.uniform(0, L, size=(T, N, 3))
    r_max, dr = 8.0, 0.5  # beyond L/2: all images needed
    r, g = M.rdf(pos, cell, True, np.ones(N, int), r_max, dr)
    g = np.asarray(g)
    expected = (N - 1) / N  # the N_a N_b normalisation of a finite ideal gas
    sel = np.asarray(r) > 2.0
    assert abs(g[sel].mean() - expected) < 0.01
    assert np.all(np.abs(g[sel] - expected) < 0.1)


def test_rdf_vmap_over_replicas_equals_loop_and_frame_mask():
    pos, cell, num = _triclinic_system(seed=5, n=4)
    reps = np.stack([pos, pos + 0.3, pos[::-1] * 1.01])  # [R, T, N, 3]

    def f(p):
        return M.rdf(p, cell, True, num, 4.0, 0.1, pairs="all")[1]

    vm = jax.jit(jax.vmap(f))(reps)
    loop = np.stack([np.asarray(f(p)) for p in reps])
    np.testing.assert_allclose(np.asarray(vm), loop, atol=1e-12)
    # masked average == average of the kept frames
    _, gm = M.rdf(pos, cell, True, num, 4.0, 0.1, frame_mask=M.stable_mask(2, 1))
    _, g0 = M.rdf(pos[:1], cell, True, num, 4.0, 0.1)
    np.testing.assert_allclose(np.asarray(gm), np.asarray(g0), atol=1e-12)


def test_distance_histogram_molecule():
    from ase.build import molecule

    at = molecule("CH3CH2OH")
    rng = np.random.default_rng(2)
    pos = at.positions[None] + 0.05 * rng.standard_normal((3, len(at), 3))
    r_max, dr = 5.0, 0.1
    r, h = M.distance_histogram(pos, r_max, dr)
    N = len(at)
    ref = []
    for p in pos:
        d = np.linalg.norm(p[:, None] - p[None], axis=-1)[~np.eye(N, dtype=bool)]
        ref.append(np.histogram(d, bins=np.arange(51) * dr)[0] / (N * (N - 1) * dr))
    np.testing.assert_allclose(np.asarray(h), np.mean(ref, axis=0), atol=1e-10)
    assert abs(float(jnp.sum(h) * dr) - 1.0) < 1e-12  # eq. 1 is a normalised density


# --------------------------------------------------------------------------------------------------
# RDF comparisons
# --------------------------------------------------------------------------------------------------


def test_wright_factor_and_jsd_analytic():
    r = np.arange(0.0, 40.0, 0.001)
    s, d = 0.5, 0.4
    g1 = np.exp(-((r - 15.0) ** 2) / (2 * s * s))
    g2 = np.exp(-((r - 15.0 - d) ** 2) / (2 * s * s))
    assert float(M.wright_factor(g1, g1)) == 0.0
    assert abs(float(M.jensen_shannon(g1, g1))) < 1e-15
    # int (g1-g2)^2 / int g2^2 = 2 (1 - exp(-d^2 / 4 s^2)) for equal-width Gaussians
    ratio = 2 * (1 - math.exp(-d * d / (4 * s * s)))
    assert abs(float(M.wright_factor(g2, g1)) - 100 * math.sqrt(ratio)) < 1e-6
    assert abs(float(M.wright_factor(g2, g1, root=False)) - 100 * ratio) < 1e-6
    # disjoint supports: JSD = ln 2 nats = 1 bit
    a = np.array([1.0, 2.0, 0.0, 0.0])
    b = np.array([0.0, 0.0, 3.0, 1.0])
    assert abs(float(M.jensen_shannon(a, b)) - math.log(2)) < 1e-12
    assert abs(float(M.jensen_shannon(a, b, base=2)) - 1.0) < 1e-12
    # two bins by hand: p = (1/4, 3/4), q = (3/4, 1/4), m = (1/2, 1/2)
    p, q = np.array([1.0, 3.0]), np.array([6.0, 2.0])  # scale does not matter
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert abs(float(M.jensen_shannon(p, q)) - kl) < 1e-12
    # RDF MAE: integral of |g1 - g2| over r
    assert abs(float(M.rdf_mae(np.ones(10), np.zeros(10), 0.1)) - 1.0) < 1e-12


# --------------------------------------------------------------------------------------------------
# EV / FV
# --------------------------------------------------------------------------------------------------


def test_energy_force_violation_by_hand():
    e_hat, e = np.array([-10.0, -11.0]), np.array([-10.5, -11.0])
    ev = M.energy_violation(e_hat, e)
    np.testing.assert_allclose(np.asarray(ev), [0.25 / (100 + 110.25), 0.0], atol=1e-15)
    f_hat = np.array([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    f = np.array([[[0.0, 0.0, 0.0], [0.0, 2.0, 2.0]]])
    # ||F_hat - F|| = sqrt(1 + 4) ; ||F_hat|| = sqrt(5) ; ||F|| = sqrt(8)
    fv = M.force_violation(f_hat, f)
    np.testing.assert_allclose(np.asarray(fv), [math.sqrt(5) / (math.sqrt(5) + math.sqrt(8))], atol=1e-15)
    v = np.array([[0.1, 0.4], [0.2, 0.8]])  # geometric means 0.2, 0.4
    s = M.violation_summary(v)
    np.testing.assert_allclose(np.asarray(s.per_replica), [0.2, 0.4], atol=1e-14)
    assert abs(float(s.mean) - 0.3) < 1e-14 and abs(float(s.std) - 0.1) < 1e-14
    assert float(M.geometric_mean(np.array([0.0, 1.0]))) == 0.0
    assert abs(float(M.geometric_mean(np.array([0.0, 1.0]), eps=1e-4)) - 1e-2) < 1e-14


# --------------------------------------------------------------------------------------------------
# stability
# --------------------------------------------------------------------------------------------------


def test_stability_rdf_window():
    nb, dr = 100, 0.1  # integral of |1| over r = 10
    ref = np.ones(nb)
    frames = np.ones((60, nb))
    frames[30:] += 1.0
    # window of 10 starting at s holds max(0, s - 20) bad frames; MAE = 10 * bad / 10 > 1.5 -> bad >= 2
    assert int(M.stability_rdf(frames, ref, dr, window=10, threshold=1.5)) == 22
    assert int(M.stability_rdf(np.ones((60, nb)), ref, dr, window=10)) == 60
    # partials: unstable as soon as any pair is
    fp = np.stack([np.ones((60, nb)), frames], axis=1)
    assert int(M.stability_rdf(fp, np.stack([ref, ref]), dr, window=10, threshold=1.5)) == 22
    assert int(M.stability_rdf(frames, ref, dr, window=10, threshold=1.5, stride=5)) == 25


def test_stability_bond():
    from ase.build import molecule

    at = molecule("CH3CH2OH")
    bonds = M.covalent_bonds(at.positions, at.numbers)
    assert len(bonds) == 8  # C-C, C-O, O-H, 5 C-H: no skin
    # strict radii sums miss real bonds (ASE C-H sum 1.07 Å < 1.09 Å bond)
    assert len(M.covalent_bonds(at.positions, at.numbers, mult=1.0)) < 8
    traj = np.repeat(at.positions[None], 20, axis=0).copy()
    i, j = bonds[0]
    u = (traj[0, j] - traj[0, i]) / np.linalg.norm(traj[0, j] - traj[0, i])
    traj[12:, j] += 0.4 * u
    assert int(M.stability_bond(traj, at.numbers)) == 20  # 0.4 Å < 0.5 Å
    traj[15:, j] += 0.2 * u
    assert int(M.stability_bond(traj, at.numbers)) == 15
    # vmap over replicas with explicit bonds
    reps = np.stack([traj, np.repeat(at.positions[None], 20, axis=0)])
    b0 = np.linalg.norm(at.positions[bonds[:, 1]] - at.positions[bonds[:, 0]], axis=-1)
    out = jax.vmap(lambda p: M.stability_bond(p, bonds=bonds, bond_lengths=b0))(reps)
    np.testing.assert_array_equal(np.asarray(out), [15, 20])


# --------------------------------------------------------------------------------------------------
# MSD, diffusivity, conductivity
# --------------------------------------------------------------------------------------------------


def _random_walk(seed, T, N, D, dt):
    rng = np.random.default_rng(seed)
    steps = rng.normal(scale=math.sqrt(2 * D * dt), size=(T - 1, N, 3))
    return np.concatenate([np.zeros((1, N, 3)), np.cumsum(steps, axis=0)]) + rng.uniform(0, 5, (1, N, 3))


def test_unwrap_recovers_trajectory():
    cell = np.array([[6.0, 0.0, 0.0], [1.5, 5.5, 0.0], [0.5, -0.8, 7.0]])
    x = _random_walk(0, 300, 10, 0.05, 1.0)
    frac = x @ np.linalg.inv(cell)
    wrapped = (frac - np.floor(frac)) @ cell
    un = M.unwrap(wrapped, cell, True)
    np.testing.assert_allclose(np.asarray(un), x - x[0] + wrapped[0], atol=1e-9)


def test_diffusivity_random_walk():
    D, dt = 1e-3, 2.0  # Å^2/fs, fs
    x = np.concatenate([_random_walk(1, 1500, 150, D, dt), _random_walk(2, 1500, 50, 4 * D, dt)], axis=1)
    species = np.array([3] * 150 + [16] * 50)
    d_li = float(M.diffusivity(x, dt, window=200, equilibration=100, species=species, select=3))
    d_s = float(M.diffusivity(x, dt, window=200, equilibration=100, species=species, select=16))
    assert abs(d_li / (D * 0.1) - 1) < 0.08  # Å^2/fs -> cm^2/s is 0.1
    assert abs(d_s / (4 * D * 0.1) - 1) < 0.12
    m = np.asarray(M.msd(x, species, select="each"))
    assert m.shape == (2, 1500) and m[:, 0].max() == 0.0
    assert abs(m[0, -1] / (6 * D * dt * 1499) - 1) < 0.2


def test_diffusivity_equals_window_loop():
    x = _random_walk(3, 60, 7, 0.01, 1.0)
    dt, K, eq = 0.5, 15, 5
    slopes = []
    for t0 in range(eq, 60 - K + 1):
        m = np.mean(np.sum((x[t0 : t0 + K] - x[t0]) ** 2, axis=-1), axis=-1)
        slopes.append(np.polyfit(np.arange(K) * dt, m, 1)[0] / 6 * 0.1)
    assert abs(float(M.diffusivity(x, dt, K, eq)) - np.mean(slopes)) < 1e-12
    # vmapped over replicas == loop
    reps = np.stack([x, 2.0 * x])
    vm = jax.vmap(lambda p: M.diffusivity(p, dt, K, eq))(reps)
    np.testing.assert_allclose(np.asarray(vm), [np.mean(slopes), 4 * np.mean(slopes)], rtol=1e-10)


def test_nernst_einstein_by_hand():
    # n = 1e22 cm^-3 = 0.01 Å^-3, D = 1e-5 cm^2/s, T = 300 K:
    # sigma = 1e22 * (1.602176634e-19)^2 * 1e-5 / (1.380649e-23 * 300) = 0.619747... S/cm
    sigma = float(M.nernst_einstein_conductivity(1e-5, 0.01, 300.0))
    assert abs(sigma - 1e22 * 1.602176634e-19**2 * 1e-5 / (1.380649e-23 * 300)) < 1e-12
    assert abs(sigma - 0.6197) < 1e-3
    assert abs(float(M.neg_log10_conductivity(sigma)) - (-math.log10(619.7474))) < 1e-4
    assert abs(float(M.nernst_einstein_conductivity(1e-5, 0.01, 300.0, charge=2)) - 4 * sigma) < 1e-12


def test_arrhenius_recovers_activation_energy():
    ea, A = 0.25, 3.0e3
    T = np.array([500.0, 600.0, 700.0, 800.0, 900.0])
    sigma = A / T * np.exp(-ea / (M.K_B_EV * T))
    fit = M.arrhenius_fit(T, sigma)
    assert abs(float(fit.activation_energy) - ea) < 1e-10
    assert abs(float(fit.prefactor) / A - 1) < 1e-10
    s300 = A / 300 * math.exp(-ea / (M.K_B_EV * 300))
    assert abs(float(fit.sigma_target) / s300 - 1) < 1e-10
    fit2 = M.arrhenius_fit(T, A * np.exp(-ea / (M.K_B_EV * T)), quantity="sigma")
    assert abs(float(fit2.activation_energy) - ea) < 1e-10
    # fitting ln(sigma) to sigma T-Arrhenius data gives a different (wrong) extrapolation
    assert abs(float(M.arrhenius_fit(T, sigma, quantity="sigma").sigma_target) / s300 - 1) > 0.1


# --------------------------------------------------------------------------------------------------
# RMSD, errors, speed
# --------------------------------------------------------------------------------------------------


def test_rmsd_errors_speed():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(4)
    ref = rng.normal(size=(12, 3))
    rot = Rotation.from_euler("xyz", [0.3, -0.7, 1.1]).as_matrix()
    traj = np.stack([ref, ref + np.array([0.3, 0.4, 0.0]), ref @ rot.T + 2.0])
    r = np.asarray(M.rmsd(traj))
    assert r[0] == 0.0 and abs(r[1] - 0.5) < 1e-12
    np.testing.assert_allclose(np.asarray(M.rmsd(traj, align=True)), 0.0, atol=1e-7)
    assert abs(float(M.energy_mae(np.array([1.0, 2.0]), np.array([1.002, 1.996]))) - 3.0) < 1e-9
    assert abs(float(M.energy_mae(np.array([1.0]), np.array([1.01]), n_atoms=10)) - 1.0) < 1e-9
    f = np.zeros((2, 3, 3))
    assert abs(float(M.force_mae(f + 0.01, f)) - 10.0) < 1e-9
    s = M.speed(n_atoms=100, n_steps=1000, seconds=10.0, dt_fs=1.0)
    assert s.atom_steps_per_s == 1e4
    assert abs(s.ns_per_day - 1e-3 / 10 * 86400) < 1e-9  # 1000 fs = 1e-3 ns in 10 s
    assert abs(s.us_per_step_atom - 100.0) < 1e-9


# --------------------------------------------------------------------------------------------------
# reference noise floor
# --------------------------------------------------------------------------------------------------


@requires_data
def test_lips_reference_noise_floor(data_root):
    """First vs second half of the 1000-frame LiPS file: WF ~1.5 % at dr = 0.05 Å (METRIC_NOTES)."""
    from jaxbench import data

    parts = [M.stack_frames(data.load("lips", s)) for s in ("train", "val", "test")]
    pos = np.concatenate([p[0] for p in parts])
    cells = np.concatenate([p[1] for p in parts])
    pbc, num = parts[0][2], parts[0][3]
    assert pos.shape[0] == 1000
    _, g1 = M.rdf(pos[:500], cells[:500], pbc, num, 5.5, 0.05)
    _, g2 = M.rdf(pos[500:], cells[500:], pbc, num, 5.5, 0.05)
    wf = float(M.wright_factor(g1, g2))
    assert 0.5 < wf < 3.0, wf
    assert 1e-5 < float(M.jensen_shannon(g1, g2)) < 1e-4
    assert 0.02 < float(M.rdf_mae(g1, g2, 0.05)) < 0.08
    # the reference against itself is "stable" by FaNE's criterion (Delta = 1.0 for LiPS)
    _, gf = M.rdf_frames(pos[500:600], cells[500:600], pbc, num, 5.5, 0.05)
    assert int(M.stability_rdf(gf, g1, 0.05, window=20, threshold=1.0)) == 100
