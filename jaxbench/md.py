"""Molecular dynamics on jax-md: compiled, batched over replicas, crash-safe, differentiable.

Units: Å, eV, amu, fs, K. jax-md integrates in its natural time unit sqrt(amu Å^2 / eV)
= 10.1805 fs (:data:`FS_PER_TIME_UNIT`); every user-facing time is in fs and converted here:
``dt = timestep_fs / 10.1805``, Langevin ``gamma = friction_per_fs * 10.1805``, Nosé–Hoover
``tau = tau_fs / 10.1805``; ``kT = 8.617333e-5 * T`` eV. Velocities on disk are Å/fs (momenta
inside are amu Å / time unit). Positions are Cartesian and never wrapped.

Temperature uses 3N degrees of freedom (as jax-md's thermostats and ASE do). The saved
``conserved_energy`` is PE + KE for NVE, the Nosé–Hoover-chain invariant (PE + KE + thermostat
energy) for NVT Nosé–Hoover, and plain PE + KE (not conserved) for Langevin.

Engine (:func:`simulate`): the rollout is a jitted ``lax.scan`` over the steps of one chunk with the
neighbor list updated inside; replicas are one batch (``lax.map`` by default, ``vmap`` on request),
split over the local devices with ``shard_map`` (on a CPU made into one device per core by
:func:`jaxbench.use_cpu_devices`, as the CLI does: 1.5x the throughput of one device on 2 cores;
BENCHMARKS.md). Between chunks the host checks neighbor-list overflow (re-allocates with
more capacity and re-runs the chunk from its start state), appends the chunk to the H5MD file and
updates a progress bar. Only one chunk of frames lives in memory unless arrays are requested.

Failures (per replica, inside the scan, every step): non-finite positions / momenta / forces,
temperature outside [0.1, 1e5] K, for molecules (no periodic axis) a bond (pairs closer than 1.2 x
the sum of covalent radii in the replica's first frame, see ``Protocol.bond_factor``) stretched by more than 0.5 Å; for any system a user
criterion checked at every saved frame: ``failure_fn(state) -> bool``, or a :class:`FailureHook` with
memory carried in the scan (e.g. :func:`jaxbench.metrics.rdf_stability_hook`, FaNE's windowed RDF
criterion). A failed replica is frozen at its last good state (the failing step is discarded; a hook
failure freezes the state it judged) and its ``failure_step`` recorded (a windowed criterion dates it
at the start of its first bad window); the others continue. Failures are results, never exceptions.

Differentiable rollouts: :func:`make_rollout` returns a pure function of (params, positions,
velocities) whose chunks are ``jax.checkpoint``-ed, so ``jax.grad`` through long rollouts keeps only
one carry per chunk plus one chunk of intermediates.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from .compiled import check as check_compiled, register as register_compiled
from .errors import DataError, JaxbenchError, NeighborListError

__all__ = [
    "FS_PER_TIME_UNIT",
    "KB_EV_PER_K",
    "ENSEMBLES",
    "FAILURE_REASONS",
    "Protocol",
    "EnergyModel",
    "as_energy_model",
    "lennard_jones",
    "morse",
    "Start",
    "start_from_frames",
    "MDResult",
    "FailureHook",
    "simulate",
    "make_rollout",
    "load_protocol",
    "protocol_cards",
]

FS_PER_TIME_UNIT = 10.180505671156725  # sqrt(amu Å^2 / eV) in fs (= 1 / ase.units.fs)
KB_EV_PER_K = 8.617333262e-5
ENSEMBLES = ("nve", "nvt_langevin", "nvt_nose_hoover")
# failure_reason bit mask
FAILURE_REASONS = {1: "non-finite", 2: "temperature", 4: "bond", 8: "structural criterion (hook)"}
T_MIN, T_MAX, BOND_STRETCH, MIN_DISTANCE = 0.1, 1e5, 0.5, 0.1
MAX_TIMESTEP_FS = 5.0
PADDING_REPLICA = 1 << 30  # failure bit of the frozen copies that pad a replica batch over devices (never returned)


class FailureHook(NamedTuple):
    """A per-replica failure criterion with memory, jax-md style ``(init, update)`` pair.

    ``init(state) -> memory`` on the start state; ``update(memory, state) -> (memory, failed, onset)``
    after every saved frame, where ``failed`` is a bool scalar and ``onset`` (int, may be traced) the
    number of saved frames before this one at which the failure is dated: 0 for an instantaneous
    criterion, ``window - 1`` for a windowed one whose failure time is the start of its first bad
    window. ``memory`` is any pytree of arrays; it lives in the scan carry (one per replica), so keep it
    small (a ring buffer of per-frame histograms is fine)."""

    init: Callable
    update: Callable


def _as_hook(failure) -> FailureHook | None:
    if failure is None or isinstance(failure, FailureHook):
        return failure
    if not callable(failure):
        raise JaxbenchError(f"failure_fn must be a callable state -> bool or a FailureHook, got {type(failure).__name__}")
    import jax.numpy as jnp

    return FailureHook(init=lambda state: jnp.zeros((), jnp.int32),
                       update=lambda mem, state: (mem, failure(state), 0))


def describe_failure(reason: int) -> str:
    return "+".join(v for k, v in FAILURE_REASONS.items() if int(reason) & k) or "none"


# --------------------------------------------------------------------------------------------------
# protocol
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One MD protocol (a ``sims/*.yaml`` card or built in Python). Times in fs, temperature in K.

    ensemble: 'nve' (velocity Verlet), 'nvt_langevin' (BAOAB, ``friction_per_fs``), or
      'nvt_nose_hoover' (chain of ``chain_length``, coupling time ``tau_fs``, default 100 dt).
    temperature_K: target (NVT) and initial Maxwell–Boltzmann temperature (all ensembles).
    replica_init: 'velocities' (one frame, distinct velocity seeds) or 'frames' (distinct frames,
      spread evenly over the split, each with its own seed).
    save_every: steps between saved frames; chunk_steps: steps per compiled chunk (a multiple of
      save_every; overflow checks, disk writes and progress happen between chunks).
    skin: neighbor-list skin (Å); capacity_multiplier: initial neighbor-list capacity factor.
    bond_factor: molecules' bonds are pairs closer than bond_factor * (r_cov_i + r_cov_j) in the first
      frame. 1.2 because the plain sum misses most bonds of thermal frames (MD17 ethanol: 1-2 of 8
      at 1.0, all 8 at 1.1-1.3; aspirin 14-15 of 21 at 1.0, 21 at 1.1-1.3).
    """

    ensemble: str = "nvt_nose_hoover"
    temperature_K: float = 300.0
    timestep_fs: float = 1.0
    steps: int = 1000
    replicas: int = 5
    friction_per_fs: float = 0.01
    tau_fs: float | None = None
    chain_length: int = 3
    save_every: int = 10
    chunk_steps: int = 100
    replica_init: str = "velocities"
    frame_split: str = "test"
    skin: float = 0.5
    capacity_multiplier: float = 1.25
    bond_factor: float = 1.2
    name: str = ""
    reference: str = ""

    def replace(self, **kw) -> "Protocol":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def validate(self) -> "Protocol":
        """Raise JaxbenchError for non-physical or inconsistent values (before any compute)."""
        where = f"protocol '{self.name}': " if self.name else "protocol: "
        if self.ensemble not in ENSEMBLES:
            raise JaxbenchError(f"{where}unknown ensemble '{self.ensemble}' (use one of {', '.join(ENSEMBLES)})")
        if not (np.isfinite(self.temperature_K) and self.temperature_K > 0):
            raise JaxbenchError(f"{where}temperature must be > 0 K, got {self.temperature_K}")
        if not (np.isfinite(self.timestep_fs) and 0 < self.timestep_fs <= MAX_TIMESTEP_FS):
            raise JaxbenchError(f"{where}timestep must be in (0, {MAX_TIMESTEP_FS}] fs, got {self.timestep_fs}")
        if int(self.steps) != self.steps or self.steps <= 0:
            raise JaxbenchError(f"{where}steps must be a positive integer, got {self.steps}")
        if int(self.replicas) != self.replicas or self.replicas <= 0:
            raise JaxbenchError(f"{where}replicas must be a positive integer, got {self.replicas}")
        if self.save_every <= 0 or self.chunk_steps <= 0 or self.chunk_steps % self.save_every:
            raise JaxbenchError(
                f"{where}chunk_steps ({self.chunk_steps}) must be a positive multiple of save_every ({self.save_every})"
            )
        if self.steps % self.save_every:
            raise JaxbenchError(f"{where}steps ({self.steps}) must be a multiple of save_every ({self.save_every})")
        if self.ensemble == "nvt_langevin" and not self.friction_per_fs > 0:
            raise JaxbenchError(f"{where}Langevin friction must be > 0 1/fs, got {self.friction_per_fs}")
        if self.ensemble == "nvt_nose_hoover":
            if self.tau_fs is not None and not self.tau_fs > 0:
                raise JaxbenchError(f"{where}Nosé–Hoover tau must be > 0 fs, got {self.tau_fs}")
            if int(self.chain_length) < 1:
                raise JaxbenchError(f"{where}chain_length must be >= 1, got {self.chain_length}")
        if self.replica_init not in ("velocities", "frames"):
            raise JaxbenchError(f"{where}replica_init must be 'velocities' or 'frames', got '{self.replica_init}'")
        if not self.skin >= 0:
            raise JaxbenchError(f"{where}skin must be >= 0, got {self.skin}")
        return self

    @property
    def kT(self) -> float:
        return KB_EV_PER_K * float(self.temperature_K)

    @property
    def dt(self) -> float:
        """Timestep in jax-md time units."""
        return float(self.timestep_fs) / FS_PER_TIME_UNIT

    @property
    def tau(self) -> float:
        return (100.0 * self.timestep_fs if self.tau_fs is None else float(self.tau_fs)) / FS_PER_TIME_UNIT

    @property
    def gamma(self) -> float:
        return float(self.friction_per_fs) * FS_PER_TIME_UNIT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Protocol":
        fields = {f.name for f in dataclasses.fields(Protocol)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise JaxbenchError(f"protocol: unknown keys {unknown} (known: {sorted(fields)})")
        return Protocol(**d)


SIMS_DIR = Path(__file__).resolve().parents[1] / "sims"  # source-tree location; protocol_cards() searches the packaged cards


def protocol_cards(directory=None) -> dict[str, Path]:
    """Protocol card files by name (``sims/<name>.yaml``)."""
    if directory:
        return {p.stem: p for p in sorted(Path(directory).glob("*.yaml"))}
    from .cards import search_dirs

    # the packaged cards (installed or source tree), then users' card folders ($JAXBENCH_CARDS)
    out: dict[str, Path] = {}
    for d in search_dirs("sims"):
        for p in sorted(d.glob("*.yaml")):
            out.setdefault(p.stem, p)
    return out


def load_protocol(name_or_path, dataset: str | None = None) -> Protocol:
    """A protocol card: a path to a YAML file or a card name in ``sims/``.

    A card has top-level protocol keys (defaults) and optionally ``datasets: {name: {overrides}}``;
    with ``dataset`` given, its overrides apply (a card listing datasets refuses others).
    """
    import yaml

    p = Path(name_or_path)
    if not p.is_file():
        cards = protocol_cards()
        if str(name_or_path) not in cards:
            from .errors import UnknownNameError

            raise UnknownNameError("protocol card", str(name_or_path), cards)
        p = cards[str(name_or_path)]
    with open(p) as fh:
        card = yaml.safe_load(fh) or {}
    per = card.pop("datasets", None) or {}
    card.pop("description", None)
    card.setdefault("name", p.stem)
    if dataset is not None and per:
        if dataset not in per:  # family entries: 'lips20' covers 'lips20-P2S5'
            fam = [k for k in per if dataset.startswith(k + "-")]
            if fam:
                dataset = max(fam, key=len)
        if dataset not in per:
            raise JaxbenchError(f"protocol card {p} has no entry for dataset '{dataset}' (it has: {', '.join(per)})")
        card.update(per[dataset] or {})
    return Protocol.from_dict(card).validate()


# --------------------------------------------------------------------------------------------------
# energy models
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class EnergyModel:
    """``fn(params, graph) -> scalar`` energy (eV) of a single-structure graph from
    :func:`jaxbench.graph.md_graph` (edges within ``cutoff``; positions are ``graph.positions``)."""

    fn: Callable
    cutoff: float
    params: Any = None
    species: tuple | None = None
    name: str = "energy"
    check_species: Callable | None = None
    ident: Any = None  # identity for caching compiled code (default: the function object)

    @property
    def key(self):
        return self.ident if self.ident is not None else ("fn", id(self.fn))

    def check(self, numbers, where: str = "") -> None:
        if self.check_species is not None:
            self.check_species(numbers, where=where)
        elif self.species is not None:
            from ase.data import chemical_symbols

            bad = sorted(set(np.unique(numbers).tolist()) - set(self.species))
            if bad:
                raise DataError(
                    f"model '{self.name}' cannot represent {', '.join(chemical_symbols[z] for z in bad)}"
                    + (f" ({where})" if where else "")
                )


def as_energy_model(obj, params=None, cutoff: float | None = None) -> EnergyModel:
    """An :class:`EnergyModel` from a ``Potential`` (with ``params``), an EnergyModel, or a callable.

    A callable is ``fn(params, graph) -> scalar`` when ``params`` is given, else ``fn(graph) ->
    scalar``; it needs ``cutoff`` (Å).
    """
    from .potential import Potential

    if isinstance(obj, EnergyModel):
        return obj if params is None else dataclasses.replace(obj, params=params)
    if isinstance(obj, Potential):
        if params is None:
            raise JaxbenchError("a Potential needs its params")
        pot = obj
        return EnergyModel(
            fn=lambda p, g: pot.energy(p, g)[0],
            cutoff=pot.r_max,
            params=params,
            species=pot.species,
            name=pot.name,
            check_species=pot.check_species,
            ident=("potential", id(pot)),
        )
    if callable(obj):
        if cutoff is None:
            raise JaxbenchError("an energy function needs its cutoff (Å)")
        if params is None:
            return EnergyModel(fn=lambda p, g: obj(g), cutoff=float(cutoff), params={}, name=getattr(obj, "__name__", "energy"),
                               ident=("graph_fn", id(obj)))
        return EnergyModel(fn=obj, cutoff=float(cutoff), params=params, name=getattr(obj, "__name__", "energy"))
    raise JaxbenchError(f"cannot make an energy model from {type(obj).__name__}")


def _pair_r(graph, cutoff):
    import jax.numpy as jnp

    from .graph import edge_vectors

    vec = edge_vectors(graph, pad_length=2.0 * cutoff)
    r2 = jnp.sum(vec * vec, axis=-1)
    inside = graph.edge_mask & (r2 < cutoff * cutoff)
    r = jnp.sqrt(jnp.where(inside, r2, cutoff * cutoff))
    return r, inside


def lennard_jones(sigma: float = 3.405, epsilon: float = 0.0104, cutoff: float = 8.5) -> EnergyModel:
    """Force-shifted Lennard-Jones (energy and force continuous at the cutoff; argon defaults).
    Params ``{'sigma', 'epsilon'}`` (differentiable)."""
    import jax.numpy as jnp

    rc = float(cutoff)

    def fn(p, graph):
        r, inside = _pair_r(graph, rc)
        s, e = p["sigma"], p["epsilon"]
        lj = lambda x: 4 * e * ((s / x) ** 12 - (s / x) ** 6)  # noqa: E731
        dlj = lambda x: 4 * e * (-12 * s**12 / x**13 + 6 * s**6 / x**7)  # noqa: E731
        pair = lj(r) - lj(rc) - (r - rc) * dlj(rc)
        return 0.5 * jnp.sum(jnp.where(inside, pair, 0.0))

    return EnergyModel(fn=fn, cutoff=rc, params={"sigma": jnp.asarray(sigma), "epsilon": jnp.asarray(epsilon)}, name="lennard_jones")


def morse(D: float = 0.5, alpha: float = 1.5, r0: float = 2.5, cutoff: float = 5.0) -> EnergyModel:
    """Morse pair potential, one parameter set for all species, smoothly switched off
    (cosine switch over the last 1 Å before ``cutoff``). Params ``{'D', 'alpha', 'r0'}``."""
    import jax.numpy as jnp

    rc = float(cutoff)
    ron = rc - 1.0

    def fn(p, graph):
        r, inside = _pair_r(graph, rc)
        x = jnp.exp(-p["alpha"] * (r - p["r0"]))
        pair = p["D"] * (x * x - 2 * x)
        t = jnp.clip((r - ron) / (rc - ron), 0.0, 1.0)
        sw = 0.5 * (1 + jnp.cos(jnp.pi * t))
        return 0.5 * jnp.sum(jnp.where(inside, pair * sw, 0.0))

    return EnergyModel(
        fn=fn, cutoff=rc, params={"D": jnp.asarray(D), "alpha": jnp.asarray(alpha), "r0": jnp.asarray(r0)}, name="morse"
    )


# --------------------------------------------------------------------------------------------------
# starting configurations
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Start:
    """Initial configurations of R replicas: positions [R, N, 3] Å (unwrapped), numbers [N], cell
    [3, 3] (rows), pbc [3]; optional velocities [R, N, 3] Å/fs (else Maxwell–Boltzmann from seeds)."""

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    velocities: np.ndarray | None = None
    frame_indices: tuple = ()

    @staticmethod
    def make(positions, numbers, cell=None, pbc=False, replicas: int = 1, velocities=None) -> "Start":
        pos = np.asarray(positions, np.float64)
        if pos.ndim == 2:
            pos = np.broadcast_to(pos, (replicas, *pos.shape)).copy()
        if pos.ndim != 3 or pos.shape[2] != 3:
            raise JaxbenchError(f"positions must be [N, 3] or [R, N, 3], got {pos.shape}")
        pbc = np.broadcast_to(np.asarray(pbc, bool), (3,)).copy()
        cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64).reshape(3, 3)
        numbers = np.asarray(numbers, np.int32).reshape(-1)
        if len(numbers) != pos.shape[1]:
            raise JaxbenchError(f"{len(numbers)} atomic numbers for {pos.shape[1]} atoms")
        vel = None if velocities is None else np.broadcast_to(np.asarray(velocities, np.float64), pos.shape).copy()
        return Start(pos, numbers, cell, pbc, vel)

    @property
    def n_replicas(self) -> int:
        return self.positions.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[1]


def start_from_frames(frames, replicas: int, mode: str = "velocities", index: int = 0) -> Start:
    """Replica starts from a ``Frames`` split: one frame (``index``) for every replica ('velocities'),
    or ``replicas`` distinct frames spread evenly over the split ('frames')."""
    if len(frames) == 0:
        raise DataError("no frames to start from")
    if mode == "velocities":
        idx = [index] * replicas
    else:
        if len(frames) < replicas:
            raise DataError(f"{replicas} replicas from distinct frames, but the split has only {len(frames)} frames")
        idx = np.linspace(0, len(frames) - 1, replicas).round().astype(int).tolist()
    f0 = frames.frame(idx[0])
    pos = []
    for i in idx:
        f = frames.frame(i)
        if not np.array_equal(f["numbers"], f0["numbers"]):
            raise DataError("replica start frames must have the same atoms in the same order", frame=i)
        if not np.allclose(f["cell"], f0["cell"]) or not np.array_equal(f["pbc"], f0["pbc"]):
            raise DataError("replica start frames must share one cell and pbc", frame=i)
        pos.append(f["positions"])
    return dataclasses.replace(
        Start.make(np.stack(pos), f0["numbers"], f0["cell"], f0["pbc"]), frame_indices=tuple(int(i) for i in idx)
    )


def _check_start(start: Start, model: EnergyModel) -> None:
    from .neighbors import neighbor_pairs

    model.check(start.numbers, where="initial frame")
    if not np.all(np.isfinite(start.positions)):
        raise DataError("initial positions are not finite")
    for r in range(start.n_replicas):
        i, j, _, d = neighbor_pairs(start.positions[r], start.cell, start.pbc, MIN_DISTANCE)
        if len(i):
            k = int(np.argmin(d))
            raise DataError(
                f"initial frame of replica {r} has overlapping atoms: distance {d[k]:.4f} Å < {MIN_DISTANCE} Å",
                atoms=(int(i[k]), int(j[k])),
            )


def _bonds(start: Start, factor: float = 1.2):
    """Per replica [R, B] (i, j, d0, mask) of bonded pairs (closer than factor * covalent radii sum
    in the replica's first frame; no neighbor-list skin); empty (B = 1, masked) if anything is periodic."""
    from ase.data import covalent_radii

    R = start.n_replicas
    if start.pbc.any():
        return np.zeros((R, 1), np.int32), np.zeros((R, 1), np.int32), np.ones((R, 1)), np.zeros((R, 1), bool)
    rc = covalent_radii[start.numbers]
    lists = []
    for r in range(R):
        x = start.positions[r]
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        i, j = np.nonzero(np.triu(d < factor * (rc[:, None] + rc[None, :]), k=1))
        lists.append((i, j, d[i, j]))
    B = max(1, max(len(b[0]) for b in lists))
    out = np.zeros((R, B), np.int32), np.zeros((R, B), np.int32), np.ones((R, B)), np.zeros((R, B), bool)
    for r, (i, j, d0) in enumerate(lists):
        out[0][r, : len(i)], out[1][r, : len(i)], out[2][r, : len(i)], out[3][r, : len(i)] = i, j, d0, True
    return out


# --------------------------------------------------------------------------------------------------
# compiled pieces
# --------------------------------------------------------------------------------------------------


def replica_keys(seed: int, n: int):
    """[n] PRNG keys, ``fold_in(PRNGKey(seed), r)``: independent of how many replicas run."""
    import jax

    base = jax.random.PRNGKey(int(seed))
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(np.arange(n))


def _require_x64():
    import jax

    if not jax.config.jax_enable_x64:
        raise JaxbenchError(
            "MD integrates in float64: enable it first with jax.config.update('jax_enable_x64', True) "
            "(the `jaxbench simulate` command does this)"
        )


def _integrator(protocol: Protocol, energy):
    from jax_md import simulate, space

    _, shift = space.free()  # positions stay unwrapped
    if protocol.ensemble == "nve":
        return simulate.nve(energy, shift, dt=protocol.dt)
    if protocol.ensemble == "nvt_langevin":
        return simulate.nvt_langevin(energy, shift, dt=protocol.dt, kT=protocol.kT, gamma=protocol.gamma)
    return simulate.nvt_nose_hoover(
        energy, shift, dt=protocol.dt, kT=protocol.kT, chain_length=int(protocol.chain_length), tau=protocol.tau
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _Engine:
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

    # -- physics -------------------------------------------------------------------------------
    def energy(self, R, neighbor=None, params=None, **unused):
        from .graph import md_graph

        g = md_graph(R, self.numbers, self.cell, self.pbc, neighbor)
        return self.model.fn(params, g)

    @property
    def masses(self):
        from ase.data import atomic_masses

        return np.asarray(atomic_masses[self.numbers], np.float64)

    def integrator(self):
        return _integrator(self.protocol, self.energy)

    def observables(self, state, nbrs, params):
        import jax.numpy as jnp

        pe = self.energy(state.position, neighbor=nbrs, params=params)
        ke = 0.5 * jnp.sum(state.momentum**2 / state.mass)
        n = state.position.shape[0]
        temp = 2.0 * ke / (3 * n * KB_EV_PER_K)
        conserved = pe + ke
        if self.protocol.ensemble == "nvt_nose_hoover":
            c = state.chain
            kT = self.protocol.kT
            conserved = conserved + c.momentum[0] ** 2 / (2 * c.mass[0]) + 3 * n * kT * c.position[0]
            conserved = conserved + jnp.sum(c.momentum[1:] ** 2 / (2 * c.mass[1:]) + kT * c.position[1:])
        return dict(
            position=state.position,
            velocity=state.momentum / state.mass / FS_PER_TIME_UNIT,
            force=state.force,
            potential_energy=pe,
            kinetic_energy=ke,
            conserved_energy=conserved,
            temperature=temp,
        )

    def check(self, state, bonds):
        """Failure bit mask (int32) of one replica's state."""
        import jax.numpy as jnp

        finite = (
            jnp.all(jnp.isfinite(state.position)) & jnp.all(jnp.isfinite(state.momentum)) & jnp.all(jnp.isfinite(state.force))
        )
        ke = 0.5 * jnp.sum(state.momentum**2 / state.mass)
        temp = 2.0 * ke / (3 * state.position.shape[0] * KB_EV_PER_K)
        bad_t = ~((temp >= T_MIN) & (temp <= T_MAX))
        bi, bj, d0, bm = bonds
        d = jnp.linalg.norm(state.position[bj] - state.position[bi], axis=-1)
        bad_b = jnp.any(bm & ~(d - d0 <= BOND_STRETCH))
        return (
            jnp.where(finite, 0, 1) | jnp.where(bad_t & finite, 2, 0) | jnp.where(bad_b & finite, 4, 0)
        ).astype(jnp.int32)

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
            state, nbrs, reason, fstep, k, mem = c

            def advance(args):
                state, nbrs = args
                new = apply_fn(state, neighbor=nbrs, params=params)
                new_nbrs = update(new.position, nbrs)
                bad = self.check(new, bonds)
                return where(bad != 0, state, new), where(bad != 0, nbrs, new_nbrs), bad

            def frozen(args):
                return args[0], args[1], jnp.zeros((), jnp.int32)

            state, nbrs, bad = lax.cond(reason != 0, frozen, advance, (state, nbrs))
            fstep = jnp.where((reason == 0) & (bad != 0), k + 1, fstep)
            return (state, nbrs, reason | bad, fstep, k + 1, mem), None

        def save(c, _):
            c, _ = lax.scan(step, c, None, length=every)
            if self.hook is not None:
                c = self.apply_hook(c, self.hook.update)
            obs = self.observables(c[0], c[1], params)
            return c, obs

        return lax.scan(save, carry, None, length=n_save)

    def apply_hook(self, c, update):
        """The saved-frame criterion on carry ``c`` (one replica, or a batch with a vmapped ``update``)."""
        import jax.numpy as jnp

        state, nbrs, reason, fstep, k, mem = c
        new_mem, failed, onset = update(mem, state)
        hit = jnp.asarray(failed, bool) & (reason == 0)
        fstep = jnp.where(hit, k - jnp.asarray(onset, jnp.int32) * int(self.protocol.save_every), fstep)
        reason = reason | jnp.where(hit, 8, 0).astype(jnp.int32)
        return state, nbrs, reason, fstep, k, new_mem

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

        from .devices import mesh

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

        from .neighbors import needs_rebuild

        _, apply_fn = self.integrator()
        update = self.nl.update
        skin = float(self.nl.skin)
        every = int(self.protocol.save_every)

        def where(mask, a, b):
            return jax.tree.map(lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), a, b)

        def step(c, _):
            state, nbrs, reason, fstep, k, mem = c
            new = jax.vmap(lambda s, nb: apply_fn(s, neighbor=nb, params=params))(state, nbrs)
            need = jax.vmap(lambda x, nb: needs_rebuild(lax.stop_gradient(x), nb.reference_positions, skin))(new.position, nbrs)
            check = jax.vmap(self.nl.check) if self.nl.check is not None else (lambda x, n: n)
            new_nbrs = lax.cond(jnp.any(need), lambda n: jax.vmap(update)(new.position, n), lambda n: check(new.position, n), nbrs)
            bad = jax.vmap(self.check)(new, bonds)
            bad = jnp.where(reason != 0, 0, bad)
            keep = (reason != 0) | (bad != 0)
            fstep = jnp.where((reason == 0) & (bad != 0), k + 1, fstep)
            return (where(keep, state, new), where(keep, nbrs, new_nbrs), reason | bad, fstep, k + 1, mem), None

        def save(c, _):
            c, _ = lax.scan(step, c, None, length=every)
            if self.hook is not None:
                c = self.apply_hook(c, jax.vmap(self.hook.update))
            obs = jax.vmap(lambda s, nb: self.observables(s, nb, params))(c[0], c[1])
            return c, obs

        c, obs = lax.scan(save, carry, None, length=n_save)
        return c, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), obs)

    def init(self, params, keys, positions, momenta, nbrs):
        """Batched jax-md init (forces at the start, Maxwell–Boltzmann momenta unless given)."""
        import jax

        init_fn, _ = self.integrator()
        mass = self.masses
        kT = self.protocol.kT

        def one(key, R, P, nb):
            return init_fn(key, R, mass=mass, kT=kT, momenta=P, neighbor=nb, params=params)

        if momenta is None:
            return jax.vmap(lambda k, R, nb: one(k, R, None, nb))(keys, positions, nbrs)
        return jax.vmap(one)(keys, positions, momenta, nbrs)


_CACHE: dict = {}
_CACHE_MAX = 64
register_compiled(_CACHE.clear)


def _cached(key, make):
    """Small process-wide cache of compiled pieces: repeated simulations of the same system and
    protocol physics reuse their jitted functions instead of recompiling (tests, sweeps)."""
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = make()
    return _CACHE[key]


def _system_key(cell, pbc, cutoff, skin, multiplier):
    return (np.asarray(cell, np.float64).tobytes(), np.asarray(pbc, bool).tobytes(), float(cutoff), float(skin), float(multiplier))


def _neighbor_fns(cell, pbc, cutoff, skin, multiplier, n_atoms):
    from .neighbors import md_neighbor_list

    def make():
        # with a skin, the model sees only the pairs within the cutoff (the skin shell is ~30% of the list)
        nl = md_neighbor_list(cell, pbc, cutoff, skin=skin, capacity_multiplier=multiplier, n_atoms=n_atoms,
                              compact_edges=skin > 0)
        rebuild = jax_jit(lambda P, t: __import__("jax").lax.map(lambda p: nl.update(p, t), P))
        return nl, rebuild

    return _cached(("nl", n_atoms) + _system_key(cell, pbc, cutoff, skin, multiplier), make)


def jax_jit(f):
    import jax

    return jax.jit(f)


def _allocate_batch(cell, pbc, cutoff, skin, multiplier, positions, max_tries: int = 8):
    """Neighbor lists for R replicas with one shared capacity: allocate from every replica's
    positions, keep the largest, rebuild it for each replica; grow the capacity until nothing
    overflows. Returns (NeighborListFns, batched Neighbors, multiplier used)."""
    import jax
    import jax.numpy as jnp

    positions = np.asarray(positions)
    for _ in range(max_tries):
        nl, rebuild = _neighbor_fns(cell, pbc, cutoff, skin, multiplier, positions.shape[1])
        uniq = {positions[r].tobytes(): r for r in range(len(positions))}
        allocs = [nl.allocate(positions[r]) for r in uniq.values()]
        template = max(allocs, key=lambda a: a.capacity)
        template = dataclasses.replace(template, edge_capacity=max(a.edge_capacity for a in allocs))
        if not bool(template.did_overflow):
            # force a rebuild for each replica (reference at infinity)
            template = dataclasses.replace(template, reference_positions=jnp.full_like(template.reference_positions, jnp.inf))
            nbrs = rebuild(jnp.asarray(positions), template)
            if not bool(np.any(np.asarray(nbrs.did_overflow))):
                return nl, nbrs, multiplier
        multiplier *= 1.5
    raise NeighborListError(f"neighbor list still overflows at capacity_multiplier {multiplier:.3g} after {max_tries} tries")


def _engine(protocol: Protocol, model: EnergyModel, start: Start, nl, failure_fn, batch, devices: int = 1):
    """The engine and its jitted functions, cached by everything that changes the compiled code."""
    import jax
    import jax.numpy as jnp

    phys = dataclasses.replace(protocol, steps=1, replicas=1, chunk_steps=protocol.save_every, name="", reference="",
                               replica_init="velocities", frame_split="test")
    key = ("engine", phys, model.key, start.numbers.tobytes(), id(nl), id(failure_fn), batch, devices)

    def make():
        eng = _Engine(protocol, model, start.numbers, start.cell, start.pbc, nl, _as_hook(failure_fn), batch, devices)

        def init_all(params, keys, positions, momenta, nbrs, bonds):
            state = eng.init(params, keys, positions, momenta, nbrs)
            # a start that already violates a criterion fails at step 0
            reason = jax.vmap(eng.check)(state, bonds)
            obs = jax.vmap(lambda s, nb: eng.observables(s, nb, params))(state, nbrs)
            mem = jax.vmap(eng.hook.init)(state) if eng.hook is not None else jnp.zeros(reason.shape, jnp.int32)
            return state, reason, obs, mem

        # keep model / hook alive so their ids stay unique while cached
        return eng, {"init_all": jax.jit(init_all), "_keep": (model, failure_fn)}

    return _cached(key, make)


# --------------------------------------------------------------------------------------------------
# simulate
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MDResult:
    """Outcome of :func:`simulate`. ``failed`` [R] bool, ``failure_step`` [R] (-1: none),
    ``failure_reason`` [R] bit mask (:data:`FAILURE_REASONS`), ``steps_done`` (steps advanced by the
    batch), ``arrays`` (the trajectory as :func:`jaxbench.trajectory.read` returns it, when kept in
    memory), ``path`` (the H5MD file, if written), ``timings`` (seconds), ``n_reallocations``, ``seed``
    (of :func:`simulate`: a reference rollout reuses it)."""

    failed: np.ndarray
    failure_step: np.ndarray
    failure_reason: np.ndarray
    steps_done: int
    protocol: Protocol
    path: Path | None = None
    arrays: dict[str, np.ndarray] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    n_reallocations: int = 0
    capacity: int = 0  # neighbor-list slots per replica (pairs within cutoff + skin)
    edge_capacity: int = 0  # edge slots the model saw per replica (pairs within cutoff), 0: all slots
    seed: int = 0
    devices: int = 1  # the replicas were split over this many devices

    @property
    def failure_time_fs(self) -> np.ndarray:
        return np.where(self.failure_step >= 0, self.failure_step * self.protocol.timestep_fs, np.nan)

    def summary(self) -> str:
        lines = []
        for r in range(len(self.failed)):
            if self.failed[r]:
                lines.append(
                    f"replica {r}: FAILED at step {self.failure_step[r]} ({self.failure_time_fs[r]:.3g} fs): "
                    f"{describe_failure(self.failure_reason[r])}"
                )
            else:
                lines.append(f"replica {r}: stable for {self.steps_done} steps")
        return "\n".join(lines)


def simulate(
    model,
    start: Start,
    protocol: Protocol,
    params=None,
    seed: int = 0,
    out=None,
    overwrite: bool = False,
    keep_arrays: bool | None = None,
    failure_fn: Callable | None = None,
    batch: str = "map",
    progress: bool = True,
    callback: Callable | None = None,
    cutoff: float | None = None,
    metadata: dict | None = None,
    devices: int | None = None,
) -> MDResult:
    """Run ``protocol`` from ``start`` with ``model`` for all replicas as one compiled batch.

    Args:
      model: a ``Potential`` (pass ``params``), an :class:`EnergyModel`, or ``fn(graph) -> scalar``
        (pass ``cutoff``).
      start: :class:`Start` (``Start.make(...)`` or :func:`start_from_frames`); its replica count wins
        over ``protocol.replicas``.
      seed: replica r's Maxwell–Boltzmann velocities (and Langevin noise) come from
        ``jax.random.fold_in(PRNGKey(seed), r)`` (:func:`replica_keys`): replica r is the same
        whatever the number of replicas.
      out: H5MD file to append to chunk by chunk (refused if it exists unless ``overwrite``).
      keep_arrays: also return the trajectory in memory (default: only when ``out`` is None).
      failure_fn: ``failure_fn(state) -> bool`` on a jax-md state (``state.position`` [N, 3] Å, ...),
        checked at every saved frame, or a :class:`FailureHook` (a criterion with memory, e.g.
        :func:`jaxbench.metrics.rdf_stability_hook`).
      batch: 'map' (``lax.map`` over replicas, default), 'vmap' (batched step with one outer
        neighbor-rebuild cond) or 'vmap_select' (plain vmap of the per-replica chunk).
      devices: split the replicas over this many local devices (each runs its share with ``batch``);
        default: all local devices, at most one per replica. On a CPU call
        :func:`jaxbench.use_cpu_devices` before JAX starts to get one device per core.
      callback: called after every chunk with a dict (chunk, steps_done, failed, path).
    """
    import jax
    import jax.numpy as jnp

    from .devices import count as device_count

    _require_x64()
    check_compiled()  # before this run compiles: a long session's cached programs stay under the kernel's limit
    protocol = protocol.validate()
    model = as_energy_model(model, params=params, cutoff=cutoff)
    if batch not in ("map", "vmap", "vmap_select"):
        raise JaxbenchError(f"batch must be 'map', 'vmap' or 'vmap_select', got '{batch}'")
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not overwrite:
        raise JaxbenchError(f"output {out} exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    _check_start(start, model)
    _as_hook(failure_fn)  # a wrong kind of criterion is named before any compute
    keep_arrays = out is None if keep_arrays is None else keep_arrays
    R, N = start.n_replicas, start.n_atoms
    devices = device_count(devices, R, JaxbenchError)
    t0 = time.perf_counter()

    nl, nbrs, mult = _allocate_batch(
        start.cell, start.pbc, model.cutoff, protocol.skin, protocol.capacity_multiplier, start.positions
    )
    params = jax.tree.map(jnp.asarray, model.params)
    eng, compiled = _engine(protocol, model, start, nl, failure_fn, batch, devices)
    keys = replica_keys(seed, R)
    momenta = None
    if start.velocities is not None:
        momenta = jnp.asarray(start.velocities * FS_PER_TIME_UNIT * eng.masses[None, :, None])
    bonds = tuple(jnp.asarray(b) for b in _bonds(start, protocol.bond_factor))
    init_all = compiled["init_all"]

    state, reason0, init_obs, mem = init_all(params, keys, jnp.asarray(start.positions), momenta, nbrs, bonds)
    carry = (state, nbrs, reason0, jnp.where(reason0 != 0, 0, -1).astype(jnp.int32), jnp.zeros(R, jnp.int32), mem)

    writer = None
    if out is not None:
        from .trajectory import TrajectoryWriter

        meta = dict(protocol=protocol.to_dict(), model=model.name, seed=int(seed), batch=batch, devices=devices,
                    frame_indices=list(start.frame_indices))
        meta.update(metadata or {})
        writer = TrajectoryWriter(out, start.numbers, eng.masses, start.cell, start.pbc, R, protocol.timestep_fs,
                                  metadata=meta, overwrite=overwrite)
    kept: list[dict] = []
    steps_list: list[np.ndarray] = []

    def emit(steps, obs):
        obs = {k: np.asarray(v) for k, v in obs.items()}
        if writer is not None:
            writer.append(steps, {k: obs[k] for k in ("position", "velocity", "force")},
                          {k: obs[k] for k in ("potential_energy", "kinetic_energy", "conserved_energy", "temperature")})
        if keep_arrays:
            kept.append(obs)
            steps_list.append(np.asarray(steps))

    emit(np.array([0]), {k: v[:, None] for k, v in init_obs.items()})

    def get_fn(n_save):
        if n_save not in compiled:
            compiled[n_save] = jax.jit(lambda p, c, b, e=eng: e.run_chunk(p, c, b, n_save))
        return compiled[n_save]

    every, chunk = int(protocol.save_every), int(protocol.chunk_steps)
    total = int(protocol.steps)
    n_chunks = math.ceil(total / chunk)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"MD {protocol.ensemble} x{R}", unit="step", leave=False)
    timings = {"setup_s": time.perf_counter() - t0, "first_chunk_s": 0.0, "chunks_s": 0.0}
    n_realloc = 0
    done = 0
    try:
        for c in range(n_chunks):
            steps_here = min(chunk, total - done)
            n_save = steps_here // every
            tc = time.perf_counter()
            while True:
                fn = get_fn(n_save)
                new_carry, obs = fn(params, carry, bonds)
                if not bool(np.any(np.asarray(new_carry[1].did_overflow))):
                    break
                n_realloc += 1
                nl, nbrs_new, mult = _allocate_batch(
                    start.cell, start.pbc, model.cutoff, protocol.skin, mult * 1.5, np.asarray(carry[0].position)
                )
                eng, compiled = _engine(protocol, model, start, nl, failure_fn, batch, devices)
                carry = (carry[0], nbrs_new) + tuple(carry[2:])
            jax.block_until_ready(new_carry)
            dt_c = time.perf_counter() - tc
            timings["first_chunk_s" if c == 0 else "chunks_s"] += dt_c
            carry = new_carry
            done += steps_here
            ks = done - steps_here + every * np.arange(1, n_save + 1)
            emit(ks, obs)
            reason = np.asarray(carry[2])
            fstep = np.asarray(carry[3])
            if writer is not None:
                writer.set_status(reason != 0, fstep, reason)
                writer.flush()
            if bar is not None:
                bar.update(steps_here)
                bar.set_postfix(failed=int((reason != 0).sum()))
            if callback is not None:
                callback(dict(chunk=c, steps_done=done, failed=reason != 0, path=out))
            if np.all(reason != 0):
                break
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close(complete=done >= total or bool(np.all(np.asarray(carry[2]) != 0)))
    reason = np.asarray(carry[2])
    arrays = None
    if keep_arrays:
        arrays = {k: np.concatenate([o[k] for o in kept], axis=1) for k in kept[0]}
        arrays["step"] = np.concatenate(steps_list)
        arrays["time"] = arrays["step"] * protocol.timestep_fs
        arrays["species"], arrays["mass"], arrays["cell"], arrays["pbc"] = start.numbers, eng.masses, start.cell, start.pbc
    timings["total_s"] = time.perf_counter() - t0
    import resource

    timings["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    return MDResult(
        failed=reason != 0,
        failure_step=np.asarray(carry[3]).astype(np.int64),
        failure_reason=reason,
        steps_done=done,
        protocol=protocol,
        path=out,
        arrays=arrays,
        timings=timings,
        n_reallocations=n_realloc,
        capacity=int(carry[1].senders.shape[-1]),
        edge_capacity=int(carry[1].edge_capacity),
        seed=int(seed),
        devices=devices,
    )


# --------------------------------------------------------------------------------------------------
# differentiable rollouts
# --------------------------------------------------------------------------------------------------


def make_rollout(
    model,
    numbers,
    cell,
    pbc,
    protocol: Protocol,
    reference_positions,
    chunk_steps: int = 10,
    capacity_multiplier: float = 2.0,
    cutoff: float | None = None,
    remat: bool = True,
):
    """A pure, differentiable rollout ``f(params, positions, velocities, key) -> dict`` of
    ``protocol.steps`` steps (single replica, no failure freezing, nothing written).

    Returns per step ``potential_energy`` [S], ``kinetic_energy`` [S], ``positions`` at every
    ``protocol.save_every`` steps [S / save_every, N, 3], plus ``did_overflow`` (check it on the
    host: the list is allocated once here from ``reference_positions`` with ``capacity_multiplier``).
    Each chunk of ``chunk_steps`` steps is wrapped in ``jax.checkpoint`` when ``remat``: reverse mode
    stores one carry per chunk and recomputes a chunk's steps during the backward pass.
    Gradients flow through positions and ``params``; the neighbor indices are piecewise constant.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    from .neighbors import md_neighbor_list

    _require_x64()
    protocol = protocol.validate()
    # params are given at call time: a placeholder here (callables are fn(params, graph))
    em = model if isinstance(model, EnergyModel) else as_energy_model(model, params={}, cutoff=cutoff)
    steps = int(protocol.steps)
    if steps % chunk_steps or chunk_steps % protocol.save_every:
        raise JaxbenchError(f"steps ({steps}) must be a multiple of chunk_steps ({chunk_steps}), itself a multiple of save_every")
    numbers = np.asarray(numbers, np.int32)
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,))
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64)
    nl = md_neighbor_list(cell, pbc, em.cutoff, skin=protocol.skin, capacity_multiplier=capacity_multiplier,
                          compact_edges=protocol.skin > 0)
    nbrs0 = nl.allocate(np.asarray(reference_positions, np.float64))
    eng = _Engine(protocol, em, numbers, cell, pbc, nl, None, "map")
    init_fn, apply_fn = eng.integrator()
    mass = eng.masses
    every = int(protocol.save_every)

    def rollout(params, positions, velocities, key=None):
        key = jax.random.PRNGKey(0) if key is None else key
        nbrs = nl.update(positions, dataclasses.replace(nbrs0, reference_positions=jnp.full_like(positions, jnp.inf)))
        momenta = velocities * FS_PER_TIME_UNIT * mass[:, None]
        state = init_fn(key, positions, mass=mass, kT=protocol.kT, momenta=momenta, neighbor=nbrs, params=params)

        def step(c, _):
            state, nbrs = c
            state = apply_fn(state, neighbor=nbrs, params=params)
            nbrs = nl.update(state.position, nbrs)
            pe = eng.energy(state.position, neighbor=nbrs, params=params)
            ke = 0.5 * jnp.sum(state.momentum**2 / state.mass)
            return (state, nbrs), (pe, ke)

        def chunk_saving(c, _):
            def inner(c, _):
                c, (pe, ke) = lax.scan(step, c, None, length=every)
                return c, (pe, ke, c[0].position)

            c, (pe, ke, pos) = lax.scan(inner, c, None, length=chunk_steps // every)
            return c, (pe.reshape(-1), ke.reshape(-1), pos)

        body = jax.checkpoint(chunk_saving) if remat else chunk_saving
        (state, nbrs), (pe, ke, pos) = lax.scan(body, (state, nbrs), None, length=steps // chunk_steps)
        return dict(
            potential_energy=pe.reshape(-1),
            kinetic_energy=ke.reshape(-1),
            positions=pos.reshape(-1, *positions.shape),
            did_overflow=nbrs.did_overflow,
        )

    return rollout
