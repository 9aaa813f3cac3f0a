"""TorchMD-Net ET specifics: agreement with torchmd-net itself, the radial basis, the cutoff of the vector
messages, the distance-influence variants and the builder's checks (float64).

The shared symmetry / finite-difference / batching tests run on the `torchmdnet-small` card in
tests/test_models.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jaxbench.models import build_module
from jaxbench.models.torchmdnet import ExpNormalSmearing, TorchMDNet, cosine_cutoff, expnorm_initial_params

jax.config.update("jax_enable_x64", True)

# A 6-atom geometry (species indices 0..2): some pairs lie beyond the 3 Å cutoff.
POSITIONS = np.array([[0.0, 0.0, 0.0], [1.43, 0.0, 0.0], [-0.52, 0.91, 0.12], [1.9, 1.3, -0.4], [2.2, -0.9, 0.6],
                      [4.1, 0.2, 0.3]])
SPECIES = np.array([1, 1, 0, 2, 0, 0])


def fill(torch_key: str, shape) -> np.ndarray:
    """Deterministic weights both sides can make: torchmd-net state_dict key + torch shape -> values."""
    i = np.arange(int(np.prod(shape)))
    return (0.5 * np.sin(0.61 * i + sum(map(ord, torch_key)) % 97)).reshape(shape)


def torch_key(path) -> tuple[str, str]:
    """Flax parameter path -> (torchmd-net state_dict key, flax leaf name): the one-to-one naming."""
    keys = [str(getattr(k, "key", k)) for k in path][1:]  # drop 'params'
    prefix = "output_model." if keys[0].startswith("output_network") else "representation_model."
    parts = []
    for m in keys[:-1]:
        if m.startswith(("attention_layers_", "output_network_")):
            parts += m.rsplit("_", 1)
        elif m.startswith("update_net_"):  # torch MLP Sequential: Linear, act, Linear
            parts += ["update_net", "layers", {"0": "0", "1": "2"}[m.rsplit("_", 1)[1]]]
        else:
            parts.append(m)
    leaf = keys[-1]
    name = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return prefix + ".".join(parts + [name]), leaf


def graph_arrays(positions, with_padding=True):
    """All ordered pairs i != j (also those beyond the cutoff, as a skin-padded neighbour list holds),
    plus two padding edges with a zero-length vector and a padding node (index 6)."""
    n = len(positions)
    senders, receivers = map(np.ravel, np.nonzero(~np.eye(n, dtype=bool)))
    if with_padding:
        senders, receivers = np.concatenate([senders, [6, 6]]), np.concatenate([receivers, [6, 6]])
        positions = np.concatenate([positions, [[0.0, 0.0, 0.0]]])
    edge_mask = np.arange(len(senders)) < n * (n - 1)
    node_mask = np.arange(len(positions)) < n
    species = np.concatenate([SPECIES, [0] * (len(positions) - n)])
    return jnp.asarray(positions), jnp.asarray(species), jnp.asarray(senders), jnp.asarray(receivers), \
        jnp.asarray(edge_mask), jnp.asarray(node_mask)


def parameter_shapes(module, *args):
    """The module's parameter tree as shapes only (abstract evaluation: no init compile, the tests set
    every value themselves)."""
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)


def sine_params(shapes, phase: float):
    """Deterministic, non-zero values for every parameter."""
    leaves, tree = jax.tree.flatten(shapes)
    return jax.tree.unflatten(tree, [0.3 * jnp.sin(jnp.arange(x.size, dtype=jnp.float64).reshape(x.shape) + phase + i)
                                     for i, x in enumerate(leaves)])


def energy_and_forces(module, params, *geometries):
    """[(energy, forces)] of each geometry (same atoms), in one compiled call."""
    _, species, senders, receivers, edge_mask, node_mask = graph_arrays(POSITIONS)
    stacked = jnp.stack([graph_arrays(g)[0] for g in geometries])

    def energy(pos):
        return jnp.sum(module.apply(params, pos[senders] - pos[receivers], species, senders, receivers, edge_mask,
                                    node_mask))

    e, g = jax.jit(jax.vmap(jax.value_and_grad(energy)))(stacked)
    return [(float(e[i]), -np.asarray(g[i])) for i in range(len(geometries))]


# Computed with torchmd-net 3.1.0 (float64; create_model with these keys, max_z=3, num_heads=2,
# embedding_dimension=8, num_layers=2, num_rbf=6, cutoff_upper=3.0, output_model Scalar -> EquivariantScalar;
# every `named_parameters()` tensor set to fill(key, shape); forward(z=SPECIES, pos=POSITIONS)).
TORCHMD_NET_REFERENCE = [
    (dict(trainable_rbf=True, distance_influence="both", vector_cutoff=False, cutoff_lower=0.0),
     4.128727954325322,
     [[-0.00899430389292585, 0.00903521402341883, -0.01059501253190793],
      [-0.02499773720053716, -0.02775882809250844, 0.09261920420967876],
      [-0.2636923141285567, 0.05438985558423093, -0.02840202868733957],
      [0.0630059296436618, 0.07944767723174129, -0.04928779140985368],
      [0.06793593411818671, -0.10692009971759853, 0.00097785864320809],
      [0.16674249146017117, -0.00819381902928409, -0.00531223022378566]]),
    (dict(trainable_rbf=False, distance_influence="keys", vector_cutoff=True, cutoff_lower=0.5),
     6.562881239994886,
     [[-0.8867666382955146, -1.9844890938393933, 0.39240178766330974],
      [-0.0867431094899791, 0.8067502870844792, -0.06708657251694115],
      [-4.0596366365140035, 1.2025065040232796, 0.27800799957072886],
      [3.9163417233981823, 3.7471022442474884, -1.9736521808964702],
      [0.5923795833242267, -4.623969083905043, 1.6678155113839064],
      [0.5244250775770886, 0.85209914238919, -0.29748654520453355]]),
]


@pytest.mark.parametrize("case", range(len(TORCHMD_NET_REFERENCE)))
def test_matches_torchmd_net(case):
    hp, energy_ref, forces_ref = TORCHMD_NET_REFERENCE[case]
    module = TorchMDNet(num_species=3, r_max=3.0, embedding_dimension=8, num_layers=2, num_rbf=6, num_heads=2,
                        neighbor_embedding=True, **hp)
    pos, species, senders, receivers, edge_mask, node_mask = graph_arrays(POSITIONS)
    params = parameter_shapes(module, pos[senders] - pos[receivers], species, senders, receivers, edge_mask, node_mask)
    n_leaves = len(jax.tree.leaves(params))

    def load(path, x):
        key, leaf = torch_key(path)
        w = fill(key, x.shape[::-1] if leaf == "kernel" else x.shape)  # torch Linear weight = kernel.T
        return jnp.asarray(w.T if leaf == "kernel" else w, jnp.float64)

    params = jax.tree_util.tree_map_with_path(load, params)
    assert len(jax.tree.leaves(params)) == n_leaves
    [(energy, forces)] = energy_and_forces(module, params, POSITIONS)
    # Without trainable basis parameters torchmd-net's means/betas are buffers computed in float32
    # (ExpNormalSmearing's default dtype); here they are exact float64: ~1e-7 relative difference.
    rtol = 1e-11 if hp["trainable_rbf"] else 1e-6
    np.testing.assert_allclose(energy, energy_ref, rtol=rtol)
    np.testing.assert_allclose(forces[:6], forces_ref, rtol=0, atol=rtol * np.abs(forces_ref).max())
    assert np.all(np.isfinite(forces)), "padding (zero-length edge, padding node) leaked NaN into the gradient"


def test_radial_basis_and_cutoff_closed_forms():
    r = np.array([0.0, 0.3, 1.0, 2.5, 4.99, 5.0, 6.0])
    for lower in (0.0, 0.5):
        mod = ExpNormalSmearing(lower, 5.0, 7, trainable=False)
        rbf = np.asarray(mod.apply({}, jnp.asarray(r)))
        # PhysNet: mu_k evenly spaced in [exp(-(r_max - r_lo)), 1], beta = (2/K (1 - exp(-(r_max - r_lo))))^-2
        start = np.exp(-(5.0 - lower))
        mu, beta = np.linspace(start, 1.0, 7), (2.0 / 7 * (1.0 - start)) ** -2
        np.testing.assert_allclose(expnorm_initial_params(lower, 5.0, 7)[0], mu)
        env = np.where(r < 5.0, 0.5 * (np.cos(np.pi * r / 5.0) + 1.0), 0.0)  # CosineCutoff(0, r_max) always
        expected = env[:, None] * np.exp(-beta * (np.exp(5.0 / (5.0 - lower) * (lower - r))[:, None] - mu) ** 2)
        np.testing.assert_allclose(rbf, expected, rtol=1e-12, atol=1e-300)
    assert np.all(np.asarray(ExpNormalSmearing(0.0, 5.0, 7).apply({}, jnp.asarray([5.0, 7.0]))) == 0.0)
    c = np.asarray(cosine_cutoff(jnp.asarray(r), 0.5, 5.0))
    bump = 0.5 * (np.cos(np.pi * (2 * (r - 0.5) / 4.5 + 1.0)) + 1.0)
    np.testing.assert_allclose(c, np.where((r > 0.5) & (r < 5.0), bump, 0.0), atol=1e-15)


def _three_atoms(module, phase):
    """xs -> energies of C-O plus an H at x beyond the O (the shared cutoff test's geometry), one compile."""
    species = jnp.array([1, 2, 0])
    senders, receivers = jnp.array([0, 1, 0, 2, 1, 2]), jnp.array([1, 0, 2, 0, 2, 1])
    ones_e, ones_n = jnp.ones(6, bool), jnp.ones(3, bool)

    def positions(x):
        return jnp.array([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [1.2 + x, 0.3, 0.0]])

    pos = positions(3.0)
    params = sine_params(parameter_shapes(module, pos[senders] - pos[receivers], species, senders, receivers, ones_e,
                                          ones_n), phase)

    def energy(x):
        pos = positions(x)
        return jnp.sum(module.apply(params, pos[senders] - pos[receivers], species, senders, receivers, ones_e, ones_n))

    return lambda xs: np.asarray(jax.jit(jax.vmap(energy))(jnp.asarray(xs)))


def test_vector_cutoff_removes_the_energy_jump_at_r_max():
    # The O-H distance crosses r_max = 5 when x crosses sqrt(25 - 0.09).
    x0 = np.sqrt(25.0 - 0.09)
    jumps = {}
    for vc in (False, True):
        module = TorchMDNet(num_species=3, r_max=5.0, embedding_dimension=8, num_layers=2, num_rbf=8, num_heads=2,
                            vector_cutoff=vc)
        inside, outside = _three_atoms(module, 1)([x0 - 1e-7, x0 + 1e-7])
        jumps[vc] = abs(inside - outside)
    # torchmd-net's original ET: the vector message vec_j * vec1 + vec2 * d_ij of the H is not cut off.
    # Across 2e-7 Å a continuous energy changes by ~1e-7 * |force| at most (here the force on H -> 0).
    assert jumps[False] > 1e-7, jumps
    assert jumps[True] < 1e-11, jumps


@pytest.mark.parametrize("distance_influence", ["values", "none"])
def test_distance_influence_variants_are_invariant(distance_influence):
    module = TorchMDNet(num_species=3, r_max=3.0, embedding_dimension=8, num_layers=2, num_rbf=6, num_heads=2,
                        distance_influence=distance_influence, vector_cutoff=True)
    pos, species, senders, receivers, edge_mask, node_mask = graph_arrays(POSITIONS)
    params = sine_params(parameter_shapes(module, pos[senders] - pos[receivers], species, senders, receivers,
                                          edge_mask, node_mask), 1.0)
    R = Rotation.random(random_state=np.random.default_rng(3)).as_matrix() @ np.diag([1.0, 1.0, -1.0])
    (e, f), (e2, f2) = energy_and_forces(module, params, POSITIONS, POSITIONS @ R.T + 1.7)
    assert np.abs(f[:6]).max() > 1e-4
    np.testing.assert_allclose(e2, e, rtol=1e-12)
    np.testing.assert_allclose(f2[:6], f[:6] @ R.T, atol=1e-10 * np.abs(f).max())


@pytest.mark.parametrize("bad, message", [
    ({"output_model": "DipoleMoment"}, "output_model"),
    ({"rbf_type": "gauss"}, "rbf_type"),
    ({"embedding_dimension": 12, "num_heads": 8}, "divisible"),
    ({"distance_influence": "queries"}, "distance_influence"),
    ({"activation": "relu"}, "activation"),
    ({"cutoff_lower": 5.0}, "cutoff_lower"),
])
def test_builder_rejects_what_is_not_implemented(bad, message):
    hp = {"r_max": 5.0, "embedding_dimension": 8, "num_heads": 2, **bad}
    with pytest.raises(ValueError, match=message):
        build_module("torchmdnet", 3, 10.0, hp)
