"""MD protocols: the settings of one run (a ``sims/*.yaml`` card or built in Python) and their units.

Users give times in fs and temperatures in K; jax-md integrates in its natural time unit
sqrt(amu Å^2 / eV) = 10.1805 fs (:data:`FS_PER_TIME_UNIT`), so the conversions live on the
:class:`Protocol` and nowhere else.
"""

from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, JaxbenchError

FS_PER_TIME_UNIT = 10.180505671156725  # sqrt(amu Å^2 / eV) in fs (= 1 / ase.units.fs)
KB_EV_PER_K = 8.617333262e-5
ENSEMBLES = ("nve", "nvt_langevin", "nvt_nose_hoover", "npt_nose_hoover")
EV_PER_A3_IN_BAR = 1.602176634e6  # 1 eV/Å^3 in bar
MAX_TIMESTEP_FS = 5.0
REPLICA_INITS = ("velocities", "frames", "fes_minima")


@dataclasses.dataclass(frozen=True)
class MetadynamicsSettings:
    """A metadynamics bias on dihedral angles (a ``metadynamics:`` block of a protocol card).

    dihedrals: atom index quadruples, one collective variable each (alanine dipeptide's phi and psi:
      ``[[4, 6, 8, 14], [6, 8, 14, 16]]``, OpenMM / IUPAC sign). height_kJ_mol: initial hill height;
      sigma_rad: Gaussian width (all CVs); pace_fs: time between deposits (a multiple of the timestep);
      bias_factor: well-tempered gamma (None: plain metadynamics); max_hills: hill buffer per replica
      (default: exactly the deposits the run makes; a full buffer is an error, never truncation).
    FaNE (Fu et al. 2023, App. B): 1.2 kJ/mol, 0.35 rad, every 1 ps; gamma 6 as OpenMM's tutorial.
    """

    dihedrals: tuple[tuple[int, int, int, int], ...]
    height_kJ_mol: float = 1.2
    sigma_rad: float = 0.35
    pace_fs: float = 1000.0
    bias_factor: float | None = None
    max_hills: int | None = None

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "protocol: ") -> "MetadynamicsSettings":
        fields = {f.name for f in dataclasses.fields(MetadynamicsSettings)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise JaxbenchError(f"{where}metadynamics: unknown keys {unknown} (known: {sorted(fields)})")
        _check_types(MetadynamicsSettings, d, where, prefix="metadynamics.")
        if "dihedrals" not in d:
            raise JaxbenchError(f"{where}metadynamics: needs `dihedrals` (atom index quadruples, one per CV)")
        try:
            dihedrals = tuple(tuple(int(i) for i in q) for q in d["dihedrals"])
        except (TypeError, ValueError):
            raise JaxbenchError(f"{where}metadynamics.dihedrals must be a list of 4 atom indices each, got "
                                f"{d['dihedrals']!r}") from None
        return MetadynamicsSettings(**{**d, "dihedrals": dihedrals})

    def validate(self, protocol: "Protocol", where: str) -> None:
        if not self.dihedrals or any(len(q) != 4 or min(q) < 0 or len(set(q)) != 4 for q in self.dihedrals):
            raise JaxbenchError(f"{where}metadynamics.dihedrals must be quadruples of 4 distinct atom indices >= 0, "
                                f"got {list(self.dihedrals)}")
        if not (self.height_kJ_mol > 0 and self.sigma_rad > 0):
            raise JaxbenchError(f"{where}metadynamics: height_kJ_mol and sigma_rad must be > 0")
        if self.bias_factor is not None and not self.bias_factor > 1:
            raise JaxbenchError(f"{where}metadynamics.bias_factor must be > 1 (or absent), got {self.bias_factor}")
        if self.max_hills is not None and int(self.max_hills) < 1:
            raise JaxbenchError(f"{where}metadynamics.max_hills must be >= 1, got {self.max_hills}")
        pace = self.pace_fs / protocol.timestep_fs
        if not (pace >= 1 and abs(pace - round(pace)) < 1e-9):
            raise JaxbenchError(f"{where}metadynamics.pace_fs ({self.pace_fs:g}) must be a positive multiple of the "
                                f"timestep ({protocol.timestep_fs:g} fs)")

    def pace_steps(self, protocol: "Protocol") -> int:
        return int(round(self.pace_fs / protocol.timestep_fs))

    def resolved(self, protocol: "Protocol") -> "MetadynamicsSettings":
        """With ``max_hills`` filled in: every deposit of ``protocol.steps`` (so it is part of the compiled shape)."""
        if self.max_hills is not None:
            return self
        return dataclasses.replace(self, max_hills=max(1, int(protocol.steps) // self.pace_steps(protocol)))


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One MD protocol (a ``sims/*.yaml`` card or built in Python). Times in fs, temperature in K.

    ensemble: 'nve' (velocity Verlet), 'nvt_langevin' (BAOAB, ``friction_per_fs``), or
      'nvt_nose_hoover' (chain of ``chain_length``, coupling time ``tau_fs``, default 100 dt), or
      'npt_nose_hoover' (isotropic Martyna-Tuckerman-Klein barostat of jax-md: the cell keeps its shape
      and scales with the volume; target ``pressure_bar``, barostat coupling time ``barostat_tau_fs``
      (default 1000 dt), Nosé–Hoover chains of ``chain_length`` on both).
    max_compression: NPT only: the largest relative volume decrease from the start the neighbour list
      covers (its radius is cutoff / (1 - max_compression)^(1/3)); a replica compressed further is
      stopped as failed ('volume'), never simulated with missing pairs.
    temperature_K: target (NVT) and initial Maxwell–Boltzmann temperature (all ensembles).
    replica_init: 'velocities' (one frame, distinct velocity seeds), 'frames' (distinct frames,
      spread evenly over the split, each with its own seed) or 'fes_minima' (with metadynamics: the
      split's frames nearest the local minima of its free-energy surface in the CVs, FaNE's six starts).
    save_every: steps between saved frames; chunk_steps: steps per compiled chunk (a multiple of
      save_every; overflow checks, disk writes and progress happen between chunks).
    skin: neighbor-list skin (Å); capacity_multiplier: initial neighbor-list capacity factor.
    bond_factor: molecules' bonds are pairs closer than bond_factor * (r_cov_i + r_cov_j) in the first
      frame. 1.2 because the plain sum misses most bonds of thermal frames (MD17 ethanol: 1-2 of 8
      at 1.0, all 8 at 1.1-1.3; aspirin 14-15 of 21 at 1.0, 21 at 1.1-1.3).
    metadynamics: a bias on collective variables (:class:`MetadynamicsSettings`), or None.
    """

    ensemble: str = "nvt_nose_hoover"
    temperature_K: float = 300.0
    timestep_fs: float = 1.0
    steps: int = 1000
    replicas: int = 5
    friction_per_fs: float = 0.01
    tau_fs: float | None = None
    chain_length: int = 3
    pressure_bar: float = 1.01325
    barostat_tau_fs: float | None = None
    max_compression: float = 0.15
    save_every: int = 10
    chunk_steps: int = 100
    replica_init: str = "velocities"
    frame_split: str = "test"
    skin: float = 0.5
    capacity_multiplier: float = 1.25
    bond_factor: float = 1.2
    name: str = ""
    reference: str = ""
    metadynamics: MetadynamicsSettings | None = None
    scoring: tuple[tuple[str, Any], ...] = ()  # the card's `scoring:` block (jaxbench.scoring.BenchSettings fields)

    def replace(self, **kw) -> "Protocol":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def validate(self) -> "Protocol":
        """Raise JaxbenchError for non-physical or inconsistent values (before any compute); the message
        names the card key at fault."""
        where = f"protocol '{self.name}': " if self.name else "protocol: "

        def bad(key: str, message: str) -> JaxbenchError:
            return JaxbenchError(f"{where}key '{key}': {message}")

        if self.ensemble not in ENSEMBLES:
            raise bad("ensemble", f"unknown ensemble '{self.ensemble}' (use one of {', '.join(ENSEMBLES)})")
        if not (np.isfinite(self.temperature_K) and self.temperature_K > 0):
            raise bad("temperature_K", f"temperature must be > 0 K, got {self.temperature_K}")
        if not (np.isfinite(self.timestep_fs) and 0 < self.timestep_fs <= MAX_TIMESTEP_FS):
            raise bad("timestep_fs", f"timestep must be in (0, {MAX_TIMESTEP_FS}] fs, got {self.timestep_fs}")
        if int(self.steps) != self.steps or self.steps <= 0:
            raise bad("steps", f"steps must be a positive integer, got {self.steps}")
        if int(self.replicas) != self.replicas or self.replicas <= 0:
            raise bad("replicas", f"replicas must be a positive integer, got {self.replicas}")
        if self.save_every <= 0 or self.chunk_steps <= 0 or self.chunk_steps % self.save_every:
            raise bad("chunk_steps", f"chunk_steps ({self.chunk_steps}) must be a positive multiple of save_every "
                                     f"({self.save_every})")
        if self.steps % self.save_every:
            raise bad("steps", f"steps ({self.steps}) must be a multiple of save_every ({self.save_every})")
        if self.ensemble == "nvt_langevin" and not self.friction_per_fs > 0:
            raise bad("friction_per_fs", f"Langevin friction must be > 0 1/fs, got {self.friction_per_fs}")
        if self.ensemble in ("nvt_nose_hoover", "npt_nose_hoover"):
            if self.tau_fs is not None and not self.tau_fs > 0:
                raise bad("tau_fs", f"Nosé–Hoover tau must be > 0 fs, got {self.tau_fs}")
            if int(self.chain_length) < 1:
                raise bad("chain_length", f"chain_length must be >= 1, got {self.chain_length}")
        if self.npt:
            if not np.isfinite(self.pressure_bar):
                raise bad("pressure_bar", f"pressure must be finite, got {self.pressure_bar}")
            if self.barostat_tau_fs is not None and not (np.isfinite(self.barostat_tau_fs) and self.barostat_tau_fs > 0):
                raise bad("barostat_tau_fs", f"barostat coupling time must be > 0 fs, got {self.barostat_tau_fs}")
            if not 0 < self.max_compression < 0.9:
                raise bad("max_compression", f"max_compression must be in (0, 0.9), got {self.max_compression}")
        if self.replica_init not in REPLICA_INITS:
            raise bad("replica_init", f"replica_init must be one of {', '.join(REPLICA_INITS)}, got '{self.replica_init}'")
        if self.replica_init == "fes_minima" and self.metadynamics is None:
            raise bad("replica_init", "replica_init 'fes_minima' needs a metadynamics block (its CVs define the surface)")
        if not self.skin >= 0:
            raise bad("skin", f"skin must be >= 0, got {self.skin}")
        if self.metadynamics is not None:
            self.metadynamics.validate(self, where)
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
    def pressure(self) -> float:
        """Target pressure in eV/Å^3."""
        return float(self.pressure_bar) / EV_PER_A3_IN_BAR

    @property
    def barostat_tau(self) -> float:
        return (1000.0 * self.timestep_fs if self.barostat_tau_fs is None else float(self.barostat_tau_fs)) / FS_PER_TIME_UNIT

    @property
    def npt(self) -> bool:
        return self.ensemble == "npt_nose_hoover"

    @property
    def list_radius_factor(self) -> float:
        """Neighbour-list radius / model cutoff: 1, or under NPT enough for the most compressed cell covered."""
        return (1.0 - float(self.max_compression)) ** (-1.0 / 3.0) if self.npt else 1.0

    @property
    def gamma(self) -> float:
        return float(self.friction_per_fs) * FS_PER_TIME_UNIT

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scoring"] = dict(self.scoring)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Protocol":
        fields = {f.name for f in dataclasses.fields(Protocol)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise JaxbenchError(f"protocol: unknown keys {unknown} (known: {sorted(fields)})")
        d = dict(d)
        where = f"protocol '{d['name']}': " if isinstance(d.get("name"), str) and d["name"] else "protocol: "
        _check_types(Protocol, d, where)
        if d.get("metadynamics") is not None:
            if not isinstance(d["metadynamics"], dict):
                raise JaxbenchError(f"{where}key 'metadynamics': must be a mapping, got {d['metadynamics']!r}")
            d["metadynamics"] = MetadynamicsSettings.from_dict(d["metadynamics"], where)
        if "scoring" in d:
            d["scoring"] = _scoring_items(d["scoring"], where)
        return Protocol(**d)


def _check_types(cls, d: dict[str, Any], where: str, prefix: str = "") -> None:
    """Refuse a value of the wrong type for a number or text field of `cls` (e.g. ``timestep_fs: fast``),
    which would otherwise fail later with a raw TypeError far from the card."""
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, kind = d[f.name], str(f.type).split(" | ")
        if v is None and "None" in kind:
            continue
        if kind[0] in ("float", "int"):
            ok, want = isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"
        elif kind[0] == "str":
            ok, want = isinstance(v, str), "text"
        else:  # nested blocks (metadynamics, scoring) are checked by their own parsers
            continue
        if not ok:
            raise JaxbenchError(f"{where}key '{prefix}{f.name}': must be {want}, got {v!r}")


def _scoring_items(raw, where: str) -> tuple:
    if raw is None or raw == ():
        return ()
    try:
        if not isinstance(raw, (dict, list, tuple)):
            raise TypeError
        return tuple(sorted(dict(raw).items()))
    except (TypeError, ValueError):
        raise JaxbenchError(f"{where}key 'scoring': must be a mapping of scoring settings, got {raw!r}") from None


SIMS_DIR = Path(__file__).resolve().parents[2] / "sims"  # source-tree location; protocol_cards() searches the packaged cards


def protocol_cards(directory=None) -> dict[str, Path]:
    """Protocol card files by name (``sims/<name>.yaml``)."""
    if directory:
        return {p.stem: p for p in sorted(Path(directory).glob("*.yaml"))}
    from ..cards import search_dirs

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
    p = Path(name_or_path)
    if not p.is_file():
        cards = protocol_cards()
        if str(name_or_path) not in cards:
            from ..errors import UnknownNameError

            raise UnknownNameError("protocol card", str(name_or_path), cards)
        p = cards[str(name_or_path)]
    card = _read_protocol_card(p)
    per = card.pop("datasets", None) or {}
    if not isinstance(per, dict):
        raise DataError(f"must be a mapping of dataset name -> overrides, got {per!r}", file=str(p), key="datasets")
    card.pop("description", None)
    card.setdefault("name", p.stem)
    if dataset is not None and per:
        if dataset not in per:  # family entries: 'lips20' covers 'lips20-P2S5'
            fam = [k for k in per if dataset.startswith(k + "-")]
            if fam:
                dataset = max(fam, key=len)
        if dataset not in per:
            raise JaxbenchError(f"protocol card {p} has no entry for dataset '{dataset}' (it has: {', '.join(per)})")
        if not isinstance(per[dataset] or {}, dict):
            raise DataError(f"overrides must be a mapping, got {per[dataset]!r}", file=str(p), key=f"datasets.{dataset}")
        card.update(per[dataset] or {})
    try:
        return Protocol.from_dict(card).validate()
    except JaxbenchError as e:  # the card's file is what the user opens to fix it
        raise DataError(str(e), file=str(p)) from None


def _read_protocol_card(p: Path) -> dict[str, Any]:
    from ..cards import read_yaml

    card = read_yaml(p, "protocol card")
    if card is None:
        raise DataError("protocol card is empty (a protocol states at least its ensemble, temperature and timestep)",
                        file=str(p))
    if not isinstance(card, dict):
        raise DataError(f"a protocol card must be a mapping of protocol keys, got {type(card).__name__}", file=str(p))
    return card
