"""Pure pieces of one optimisation step: optimiser, losses, the jitted (data-parallel) step, SWA averaging.

Nothing here touches the run directory or the host loop; :func:`step_functions` caches its jitted
functions by everything their closures read, so tests and sweeps compile once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import compiled
from .config import WEIGHT_KEYS, ConfigError, TrainingConfig

def parameter_path(path) -> str:
    """'interaction_0/linear_0e' for the key path of a leaf; the flax collection ('params') is dropped."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if keys and keys[0] == "params":
        keys = keys[1:]
    return "/".join(keys)


def weight_decay_mask(params, patterns):
    """Pytree of bools like `params`: True where the leaf's `parameter_path` matches one of `patterns`
    (fnmatch globs; `*` also crosses '/'). None patterns: every leaf. A pattern that matches no leaf is
    a ConfigError naming it (a typo would otherwise silently switch weight decay off)."""
    from fnmatch import fnmatchcase

    if patterns is None:
        return jax.tree.map(lambda _: True, params)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [parameter_path(p) for p, _ in leaves]
    for pat in patterns:
        if not any(fnmatchcase(q, pat) for q in paths):
            raise ConfigError(f"training.weight_decay_on: pattern {pat!r} matches no parameter; parameter paths "
                              f"are like {', '.join(sorted(paths)[:6])}, ...")
    return jax.tree_util.tree_unflatten(treedef, [any(fnmatchcase(q, pat) for pat in patterns) for q in paths])


def make_optimizer(cfg: TrainingConfig):
    """optax transformation giving the update direction; the step applies -lr * direction."""
    import optax

    parts = []
    if cfg.clip_grad:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad))
    # mace-torch's parameter groups give weight_decay only to interaction `linear` weights and products;
    # the mask is a function of the parameter tree, so it is built when the optimizer state is.
    mask = None if cfg.weight_decay_on is None else (lambda p: weight_decay_mask(p, cfg.weight_decay_on))
    if cfg.optimizer in ("adam", "amsgrad") and cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))  # torch Adam(weight_decay): L2 on the gradient
    parts.append(optax.scale_by_amsgrad() if cfg.optimizer == "amsgrad" else optax.scale_by_adam())
    if cfg.optimizer == "adamw" and cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))  # decoupled
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def loss_sums(out: dict, graph, cfg: TrainingConfig) -> dict[str, jax.Array]:
    """Sums and counts of each loss term and of absolute errors over a padded batch (means = sum / count)."""
    dtype = out["energy"].dtype

    def pen(x):
        if cfg.loss == "huber":
            return jnp.where(jnp.abs(x) <= cfg.huber_delta, 0.5 * x**2, cfg.huber_delta * (jnp.abs(x) - 0.5 * cfg.huber_delta))
        return x**2

    n = jnp.maximum(graph.n_node, 1).astype(dtype)
    gm = (graph.graph_mask & graph.has_energy).astype(dtype)
    de = out["energy"] - graph.energy.astype(dtype)
    de_l = de / n if cfg.energy_per_atom else de
    fm = (graph.node_mask & graph.has_forces[graph.node_graph]).astype(dtype)
    df = out["forces"] - graph.forces.astype(dtype)
    s = {
        "energy": jnp.sum(gm * pen(de_l)), "n_energy": jnp.sum(gm),
        "forces": jnp.sum(fm[:, None] * pen(df)), "n_forces": 3 * jnp.sum(fm),
        "energy_abs": jnp.sum(gm * jnp.abs(de)), "energy_sq": jnp.sum(gm * de**2),
        "energy_atom_abs": jnp.sum(gm * jnp.abs(de / n)),
        "forces_abs": jnp.sum(fm[:, None] * jnp.abs(df)), "forces_sq": jnp.sum(fm[:, None] * df**2),
    }
    if "stress" in out:
        sm = (graph.graph_mask & graph.has_stress).astype(dtype)
        ds = out["stress"] - graph.stress.astype(dtype)
        dv = ds * (graph.volume.astype(dtype) / n)[:, None, None]
        s.update(stress=jnp.sum(sm[:, None, None] * pen(ds)), virials=jnp.sum(sm[:, None, None] * pen(dv)),
                 n_stress=9 * jnp.sum(sm), stress_abs=jnp.sum(sm[:, None, None] * jnp.abs(ds)))
    return s


def combine(sums: dict, weights: dict) -> dict:
    """Weighted loss and its terms from `loss_sums` (works on jax or host values)."""
    terms = {}
    for k in WEIGHT_KEYS:
        if k not in sums:
            continue
        cnt = sums["n_stress"] if k in ("stress", "virials") else sums[f"n_{k}"]
        terms[k] = sums[k] / jnp.maximum(cnt, 1)
    loss = sum(weights[k] * v for k, v in terms.items())
    return dict(loss=loss, **terms)


def cast_graph(graph, dtype):
    """The graph's float arrays in the training dtype."""
    f = lambda x: np.asarray(x, dtype=dtype)  # noqa: E731
    return graph.replace(positions=f(graph.positions), cell=f(graph.cell), shifts=f(graph.shifts),
                         energy=f(graph.energy), forces=f(graph.forces), stress=f(graph.stress))


def add_sums(acc: dict, sums: dict) -> dict:
    """Accumulate loss sums (device scalars) into host floats."""
    for k, v in sums.items():
        acc[k] = acc.get(k, 0.0) + float(v)
    return acc


# ---------------------------------------------------------------------------------------------



_FN_CACHE: dict[str, tuple] = {}
compiled.register(_FN_CACHE.clear)


def step_functions(pot, cfg: TrainingConfig, tx, compute_stress: bool, devices: int = 1):
    """Jitted (train_step, eval_sums) for this model, loss, optimizer and EMA; reused across `train` calls
    with the same settings (the key holds everything the closures read), so tests and sweeps compile once.

    With `devices` > 1 the step is data-parallel: the batch comes split on a leading axis
    (`FrameGraphs.sharded_batch`), each device takes the gradient of its part of the loss, normalised by
    the whole batch's counts (the loss is a weighted sum of per-term sums / counts, so the parts add up
    to the full batch's loss exactly), the gradients are summed across devices and every device applies
    the same update: the same optimisation as one device, up to summation order."""
    import json

    key = json.dumps(dict(
        architecture=pot.card["architecture"], hp=pot.card["hyperparameters"], stats=pot.statistics.to_json(),
        loss=cfg.loss, delta=cfg.huber_delta, per_atom=cfg.energy_per_atom, opt=cfg.optimizer, wd=cfg.weight_decay, wd_on=cfg.weight_decay_on,
        clip=cfg.clip_grad, ema=cfg.ema, ema_decay=cfg.ema_decay, ema_num=cfg.ema_use_num_updates, stress=compute_stress,
        devices=devices,
    ), sort_keys=True, default=str)
    if key in _FN_CACHE:
        return _FN_CACHE[key]
    ema_decay, use_num = cfg.ema_decay, cfg.ema_use_num_updates
    axis = "batch" if devices > 1 else None

    def total(x):
        return jax.lax.psum(x, axis) if axis else x

    def train_step(state, graph, lr, weights, n_updates):
        if axis:
            graph = jax.tree.map(lambda x: x[0], graph)  # this device's part: [1, ...] -> [...]

        def loss_fn(p):
            out_ = pot(p, graph, compute_stress)
            sums = loss_sums(out_, graph, cfg)
            counts = {k: jax.lax.stop_gradient(total(v)) for k, v in sums.items() if k.startswith("n_")}
            return combine(dict(sums, **counts), weights)["loss"], sums

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        loss, sums, grads = total(loss), jax.tree.map(total, sums), jax.tree.map(total, grads)
        direction, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), state["params"], direction)
        new = dict(params=params, opt_state=opt_state)
        if "ema_params" in state:
            d = jnp.minimum(ema_decay, (1.0 + n_updates) / (10.0 + n_updates)) if use_num else ema_decay
            new["ema_params"] = jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), state["ema_params"], params)
        return new, loss, sums

    step = train_step
    if axis:
        from jax.sharding import PartitionSpec as P

        from ..devices import mesh

        step = jax.shard_map(train_step, mesh=mesh(devices, axis), in_specs=(P(), P(axis), P(), P(), P()), out_specs=(P(), P(), P()),
                             check_vma=False)
    step = jax.jit(step)
    if axis:  # the state: on one device at the first step, replicated after it
        from ..devices import inputs_on_mesh

        step = inputs_on_mesh(step, devices, axis, n_args=1)
    fns = (step, jax.jit(lambda p, g: loss_sums(pot(p, g, compute_stress), g, cfg)), jax.jit(pot.module.init))
    if len(_FN_CACHE) > 8:
        _FN_CACHE.clear()
    _FN_CACHE[key] = fns
    return fns


@jax.jit
def _swa_mean(avg, params, n):
    return jax.tree.map(lambda a, p: (a + (p - a) / (n + 1)).astype(a.dtype), avg, params)


def swa_update(avg, params, n_averaged: int):
    """Equal-weight running mean after `n_averaged` earlier members (torch AveragedModel.update_parameters:
    the first member is copied, then avg + (p - avg) / (n + 1))."""
    if n_averaged == 0:
        return jax.tree.map(lambda p: p, params)
    return _swa_mean(avg, params, float(n_averaged))


def init_params(pot, init_fn, key, graph, dtype):
    """`Potential.init` with a cached jitted `module.init` (same parameters; compiled once per model)."""
    from ..graph import edge_vectors
    from ..potential import cast_params

    vectors = edge_vectors(graph, pad_length=2 * pot.r_max).astype(dtype)
    params = init_fn(key, vectors, pot.species_index(graph.species), graph.senders, graph.receivers,
                     graph.edge_mask, graph.node_mask)
    return cast_params(params, dtype)
