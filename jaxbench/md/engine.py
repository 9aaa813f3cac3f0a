"""The compiled chunk: a jitted ``lax.scan`` over the steps of one chunk, state in, state and frames out.

Nothing here touches the host: no IO, no syncs, so the whole chunk stays one XLA program. Replicas
are one batch (``lax.map`` by default, ``vmap`` on request), split over the local devices with
``shard_map``; the neighbor list is updated inside the scan and its overflow only flagged, for the
driver to act on between chunks. Compiled pieces are cached by everything that changes their code,
so repeated simulations of one system reuse them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..compiled import register as register_compiled
from ..errors import JaxbenchError
from .failures import PADDING_REPLICA, VOLUME_BIT, FailureHook, apply_hook, as_hook, failure_mask
from .bias import metadynamics_of
from .integrators import integrator
from .potentials import EnergyModel
from .protocol import EV_PER_A3_IN_BAR, FS_PER_TIME_UNIT, KB_EV_PER_K, Protocol
from .start import Start


def npt_box(state):
    """The cell of an NPT state (jax-md's ``simulate.npt_box``: the reference cell scaled with the volume)."""
    from jax_md import simulate

    return simulate.npt_box(state)


def require_x64():
    """Raise unless JAX runs in float64: the integration needs it."""
    import jax

    if not jax.config.jax_enable_x64:
        raise JaxbenchError(
            "MD integrates in float64: enable it first with jax.config.update('jax_enable_x64', True) "
            "(the `jaxbench simulate` command does this)"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Engine:
    """Compiled functions for one (protocol, model, system, neighbor-list settings)."""

    protocol: Protocol
    model: EnergyModel
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    nl: Any  # NeighborListFns
    hook: FailureHook | None
    batch: str  # 'map' | 'vmap'
    devices: int = 1  # replicas split over this many local devices (shard_map), each runs `batch`
    bias: Any = None  # jaxbench.metadynamics.Metadynamics, or None

    # The scan carry of one replica is (state, neighbors, failure reason, failure step, step, hook
    # memory, hills): hills is the metadynamics buffer, a placeholder scalar without a bias.

    # -- physics -------------------------------------------------------------------------------
    def energy(self, R, neighbor=None, params=None, hills=None, box=None, perturbation=None, **unused):
        """The model's energy, plus the bias when ``hills`` are given (jax-md passes them through).
        NPT: ``box`` is the cell of this step (the start cell scaled, rows = lattice vectors) and
        ``perturbation`` jax-md's isotropic strain ``1 + eps`` (its dU/d eps is the virial)."""
        import jax.numpy as jnp

        from ..graph import md_graph

        cell, select = self.cell, None
        if box is not None:
            cell = box
            select = (R / self.box_scale(box), jnp.asarray(self.cell, R.dtype))  # the list's own frame
        if perturbation is not None:
            R, cell = R * perturbation, cell * perturbation
        g = md_graph(R, self.numbers, cell, self.pbc, neighbor, select=select)
        e = self.model.fn(params, g)
        if self.bias is not None and hills is not None:
            e = e + self.bias_energy(R, hills)
        return e

    def box_scale(self, box):
        """Linear scale of an NPT cell against the start cell."""
        import jax.numpy as jnp

        return jnp.cbrt(jnp.linalg.det(box) / float(np.linalg.det(self.cell)))

    def list_positions(self, state):
        """Positions as the neighbour list sees them: under NPT scaled back to the start cell (the integer
        image shifts of a pair stay valid while the cell scales), else the positions. Single or batched."""
        if not self.protocol.npt:
            return state.position
        import jax.numpy as jnp

        return state.position / jnp.exp(state.box_position)[..., None, None]

    def bias_energy(self, R, hills):
        from ..metadynamics import bias_at

        return bias_at(self.bias, hills, self.bias.cv_fn(R))

    def initial_hills(self, dtype):
        import jax.numpy as jnp

        from ..metadynamics import init_hills

        return jnp.zeros((), jnp.int32) if self.bias is None else init_hills(self.bias, dtype)

    def deposit(self, hills, positions, step):
        from ..metadynamics import maybe_deposit

        return hills if self.bias is None else maybe_deposit(self.bias, hills, positions, step)

    @property
    def masses(self):
        from ase.data import atomic_masses

        return np.asarray(atomic_masses[self.numbers], np.float64)

    def integrator(self):
        return integrator(self.protocol, self.energy)

    def observables(self, state, nbrs, params, hills=None):
        """One frame. Under a bias, ``potential_energy`` and ``force`` are the model's alone (what the
        model is scored on); the bias energy and the CVs are frames of their own."""
        import jax
        import jax.numpy as jnp

        box = npt_box(state) if self.protocol.npt else None
        pe = self.energy(state.position, neighbor=nbrs, params=params, box=box)
        ke = 0.5 * jnp.sum(state.momentum**2 / state.mass)
        n = state.position.shape[0]
        temp = 2.0 * ke / (3 * n * KB_EV_PER_K)
        conserved = pe + ke
        kT = self.protocol.kT
        if self.protocol.ensemble in ("nvt_nose_hoover", "npt_nose_hoover"):
            c = state.chain if self.protocol.ensemble == "nvt_nose_hoover" else state.thermostat
            conserved = conserved + c.momentum[0] ** 2 / (2 * c.mass[0]) + 3 * n * kT * c.position[0]
            conserved = conserved + jnp.sum(c.momentum[1:] ** 2 / (2 * c.mass[1:]) + kT * c.position[1:])
        force, extra = state.force, {}
        if box is not None:  # jax-md's npt_nose_hoover_invariant, and the virial pressure (kinetic + dU/d eps)
            b = state.barostat
            volume = jnp.abs(jnp.linalg.det(box))
            conserved = conserved + jnp.sum(b.momentum**2 / (2 * b.mass) + kT * b.position)
            conserved = conserved + self.protocol.pressure * volume + state.box_momentum**2 / (2 * state.box_mass)
            dU = jax.grad(lambda e: self.energy(state.position, neighbor=nbrs, params=params, box=box,
                                                perturbation=1.0 + e))(jnp.zeros((), box.dtype))
            extra = dict(volume=volume, pressure=(2.0 * ke - dU) / (3.0 * volume) * EV_PER_A3_IN_BAR, box_edges=box)
        if self.bias is not None:
            vb, gb = jax.value_and_grad(self.bias_energy)(state.position, hills)
            force = force + gb  # state.force is -grad(model + bias)
            conserved = conserved + vb
            extra = dict(extra, bias_energy=vb, cv=self.bias.cv_fn(state.position))
        return dict(
            position=state.position,
            velocity=state.momentum / state.mass / FS_PER_TIME_UNIT,
            force=force,
            potential_energy=pe,
            kinetic_energy=ke,
            conserved_energy=conserved,
            temperature=temp,
            **extra,
        )

    def check(self, state, bonds):
        """Failure bit mask (int32) of one replica's state."""
        bad = failure_mask(state, bonds)
        if self.protocol.npt:  # compressed past what the neighbour list covers: stopped, not run with missing pairs
            import jax.numpy as jnp

            smallest = np.log(1.0 - float(self.protocol.max_compression)) / 3.0  # box_position = ln(linear scale)
            bad = bad | jnp.where(state.box_position < smallest, VOLUME_BIT, 0).astype(bad.dtype)
        return bad

    # -- one replica ---------------------------------------------------------------------------
    def chunk_one(self, params, carry, bonds, n_save: int):
        """Advance one replica by n_save * save_every steps; returns (carry, per-frame observables)."""
        import jax
        import jax.numpy as jnp
        from jax import lax

        _, apply_fn = self.integrator()
        update = self.nl.update
        every = int(self.protocol.save_every)

        def where(c, a, b):
            return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)

        def step(c, _):
            state, nbrs, reason, fstep, k, mem, hills = c

            def advance(args):
                state, nbrs, hills = args
                new = apply_fn(state, neighbor=nbrs, params=params, hills=hills)
                new_nbrs = update(self.list_positions(new), nbrs)
                bad = self.check(new, bonds)
                new_hills = self.deposit(hills, new.position, k + 1)
                return (where(bad != 0, state, new), where(bad != 0, nbrs, new_nbrs), where(bad != 0, hills, new_hills),
                        bad)

            def frozen(args):
                return args + (jnp.zeros((), jnp.int32),)

            state, nbrs, hills, bad = lax.cond(reason != 0, frozen, advance, (state, nbrs, hills))
            fstep = jnp.where((reason == 0) & (bad != 0), k + 1, fstep)
            return (state, nbrs, reason | bad, fstep, k + 1, mem, hills), None

        def save(c, _):
            c, _ = lax.scan(step, c, None, length=every)
            if self.hook is not None:
                c = self.apply_hook(c, self.hook.update)
            obs = self.observables(c[0], c[1], params, c[6])
            return c, obs

        return lax.scan(save, carry, None, length=n_save)

    def apply_hook(self, c, update):
        """The saved-frame criterion on carry ``c`` (one replica, or a batch with a vmapped ``update``)."""
        return apply_hook(c, update, self.protocol.save_every)

    # -- batched -------------------------------------------------------------------------------
    def run_chunk(self, params, carry, bonds, n_save: int):
        if self.devices > 1:
            return self.run_chunk_sharded(params, carry, bonds, n_save)
        return self.run_chunk_local(params, carry, bonds, n_save)

    def run_chunk_sharded(self, params, carry, bonds, n_save: int):
        """Replicas split over `devices` local devices, each device running its share with `batch`.
        On a CPU host made of several XLA devices (:func:`jaxbench.use_cpu_devices`) each share runs on
        its own core: one XLA program keeps ~1.3-1.6 of 2 cores busy (its small ops are serial),
        two keep both (BENCHMARKS.md). A replica count that does not divide is padded with frozen
        copies of replica 0 (failure bit set: skipped under 'map', computed and discarded under 'vmap'),
        dropped again on the way out."""
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        from ..devices import mesh

        R = carry[2].shape[0]
        n_dev = self.devices
        pad = -R % n_dev

        def padded(x):
            return jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)], axis=0) if pad else x

        carry_p, bonds_p = jax.tree.map(padded, (carry, bonds))
        if pad:
            reason = carry_p[2].at[R:].set(PADDING_REPLICA)
            carry_p = carry_p[:2] + (reason,) + tuple(carry_p[3:])
        local = jax.shard_map(
            lambda p, c, b: self.run_chunk_local(p, c, b, n_save), mesh=mesh(n_dev, "replica"),
            in_specs=(P(), P("replica"), P("replica")), out_specs=(P("replica"), P("replica")), check_vma=False,
        )
        new_carry, obs = local(params, carry_p, bonds_p)
        return jax.tree.map(lambda x: x[:R], (new_carry, obs))

    def run_chunk_local(self, params, carry, bonds, n_save: int):
        import jax
        from jax import lax

        f = lambda c, b: self.chunk_one(params, c, b, n_save)  # noqa: E731
        if self.batch == "vmap_select":
            return jax.vmap(f)(carry, bonds)
        if self.batch == "vmap":
            return self.chunk_batched(params, carry, bonds, n_save)
        return lax.map(lambda x: f(*x), (carry, bonds))

    def chunk_batched(self, params, carry, bonds, n_save: int):
        """vmap layout with ONE outer ``lax.cond`` for the neighbor rebuild ("does any replica need
        one?"): a plain vmap of the per-replica step turns each replica's rebuild cond into a select,
        i.e. a rebuild at every step. Frozen replicas are computed and discarded (select)."""
        import jax
        import jax.numpy as jnp
        from jax import lax

        from ..neighbors import needs_rebuild

        _, apply_fn = self.integrator()
        update = self.nl.update
        skin = float(self.nl.skin)
        every = int(self.protocol.save_every)

        def where(mask, a, b):
            return jax.tree.map(lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), a, b)

        def step(c, _):
            state, nbrs, reason, fstep, k, mem, hills = c
            new = jax.vmap(lambda s, nb, h: apply_fn(s, neighbor=nb, params=params, hills=h))(state, nbrs, hills)
            lp = self.list_positions(new)
            need = jax.vmap(lambda x, nb: needs_rebuild(lax.stop_gradient(x), nb.reference_positions, skin))(lp, nbrs)
            check = jax.vmap(self.nl.check) if self.nl.check is not None else (lambda x, n: n)
            new_nbrs = lax.cond(jnp.any(need), lambda n: jax.vmap(update)(lp, n), lambda n: check(lp, n), nbrs)
            bad = jax.vmap(self.check)(new, bonds)
            bad = jnp.where(reason != 0, 0, bad)
            keep = (reason != 0) | (bad != 0)
            fstep = jnp.where((reason == 0) & (bad != 0), k + 1, fstep)
            new_hills = jax.vmap(lambda h, x, kk: self.deposit(h, x, kk + 1))(hills, new.position, k)
            return (where(keep, state, new), where(keep, nbrs, new_nbrs), reason | bad, fstep, k + 1, mem,
                    where(keep, hills, new_hills)), None

        def save(c, _):
            c, _ = lax.scan(step, c, None, length=every)
            if self.hook is not None:
                c = self.apply_hook(c, jax.vmap(self.hook.update))
            obs = jax.vmap(lambda s, nb, h: self.observables(s, nb, params, h))(c[0], c[1], c[6])
            return c, obs

        c, obs = lax.scan(save, carry, None, length=n_save)
        return c, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), obs)

    def init(self, params, keys, positions, momenta, nbrs):
        """Batched jax-md init (forces at the start, Maxwell–Boltzmann momenta unless given)."""
        import jax

        init_fn, _ = self.integrator()
        mass = self.masses
        kT = self.protocol.kT

        box = {"box": np.asarray(self.cell, np.float64)} if self.protocol.npt else {}  # NPT: the reference cell

        def one(key, R, P, nb):
            return init_fn(key, R, mass=mass, kT=kT, momenta=P, neighbor=nb, params=params, **box)

        if momenta is None:
            return jax.vmap(lambda k, R, nb: one(k, R, None, nb))(keys, positions, nbrs)
        return jax.vmap(one)(keys, positions, momenta, nbrs)


_CACHE: dict = {}
_CACHE_MAX = 64
register_compiled(_CACHE.clear)


def cached(key, make):
    """Small process-wide cache of compiled pieces: repeated simulations of the same system and
    protocol physics reuse their jitted functions instead of recompiling (tests, sweeps)."""
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = make()
    return _CACHE[key]


def system_key(cell, pbc, cutoff, skin, multiplier):
    """Cache key of everything about a system and its neighbor list that changes compiled code."""
    return (np.asarray(cell, np.float64).tobytes(), np.asarray(pbc, bool).tobytes(), float(cutoff), float(skin), float(multiplier))


def neighbor_fns(cell, pbc, cutoff, skin, multiplier, n_atoms):
    """Cached (NeighborListFns, jitted batched rebuild) of one system and list setting."""
    from ..neighbors import md_neighbor_list

    def make():
        # with a skin, the model sees only the pairs within the cutoff (the skin shell is ~30% of the list)
        nl = md_neighbor_list(cell, pbc, cutoff, skin=skin, capacity_multiplier=multiplier, n_atoms=n_atoms,
                              compact_edges=skin > 0)
        rebuild = jax_jit(lambda P, t: __import__("jax").lax.map(lambda p: nl.update(p, t), P))
        return nl, rebuild

    return cached(("nl", n_atoms) + system_key(cell, pbc, cutoff, skin, multiplier), make)


def jax_jit(f):
    """``jax.jit`` with JAX imported on first use."""
    import jax

    return jax.jit(f)


def compiled_engine(protocol: Protocol, model: EnergyModel, start: Start, nl, failure_fn, batch, devices: int = 1):
    """The engine and its jitted functions, cached by everything that changes the compiled code."""
    import jax
    import jax.numpy as jnp

    meta = protocol.metadynamics.resolved(protocol) if protocol.metadynamics is not None else None
    phys = dataclasses.replace(protocol, steps=1, replicas=1, chunk_steps=protocol.save_every, name="", reference="",
                               replica_init="velocities", frame_split="test", metadynamics=meta, scoring=())
    key = ("engine", phys, model.key, start.numbers.tobytes(), id(nl), id(failure_fn), batch, devices)

    def make():
        bias = metadynamics_of(protocol, start.n_atoms)
        eng = Engine(protocol, model, start.numbers, start.cell, start.pbc, nl, as_hook(failure_fn), batch, devices, bias)

        def init_all(params, keys, positions, momenta, nbrs, bonds):
            state = eng.init(params, keys, positions, momenta, nbrs)
            # a start that already violates a criterion fails at step 0
            reason = jax.vmap(eng.check)(state, bonds)
            hills = jax.vmap(lambda _: eng.initial_hills(positions.dtype))(reason)
            obs = jax.vmap(lambda s, nb, h: eng.observables(s, nb, params, h))(state, nbrs, hills)
            mem = jax.vmap(eng.hook.init)(state) if eng.hook is not None else jnp.zeros(reason.shape, jnp.int32)
            return state, reason, obs, mem, hills

        # keep model / hook alive so their ids stay unique while cached
        return eng, {"init_all": jax.jit(init_all), "_keep": (model, failure_fn)}

    return cached(key, make)


def chunk_fn(compiled: dict, eng: Engine, n_save: int):
    """The jitted chunk of ``n_save`` saved frames of ``eng``, kept in its ``compiled`` dict."""
    import jax

    if n_save not in compiled:
        def chunk(params, carry, bonds):
            return eng.run_chunk(params, carry, bonds, n_save)

        f = jax.jit(chunk)
        if eng.devices > 1:  # first inputs (init, a resume, a re-allocation) on one device, later ones replicated
            from ..devices import inputs_on_mesh

            f = inputs_on_mesh(f, eng.devices, "replica")
        compiled[n_save] = f
    return compiled[n_save]
