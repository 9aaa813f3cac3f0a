"""Dataset statistics that models are built with (computed on the training split only).

- per-species reference energies E0[Z] by least squares, E_frame ~ sum_Z n_Z(frame) E0[Z];
- the residual (interaction) energy per atom: mean and standard deviation (the usual shift / scale);
- force RMS (the usual scale of NequIP / MACE outputs);
- mean number of neighbours within the model cutoff (normalises message sums in NequIP and MACE).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any

import numpy as np

from .errors import DataError
from .frames import Frames


@dataclasses.dataclass(frozen=True)
class DatasetStatistics:
    species: tuple[int, ...]  # sorted atomic numbers seen in training
    atomic_energies: dict[int, float]  # eV, least-squares E0 per species
    energy_per_atom_mean: float  # eV/atom, mean of (E - sum E0) / N
    energy_per_atom_std: float  # eV/atom
    force_rms: float  # eV/Å
    avg_num_neighbors: float  # within `cutoff`
    cutoff: float  # Å
    n_frames: int

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["atomic_energies"] = {str(k): v for k, v in self.atomic_energies.items()}
        d["species"] = list(self.species)
        return d

    @staticmethod
    def from_json(d: dict[str, Any], file=None) -> "DatasetStatistics":
        """From `to_json`'s dict; a missing, unknown or non-physical entry is a `DataError` naming `file` and the key."""
        if not isinstance(d, dict):
            raise DataError(f"dataset statistics must be a JSON object, got {type(d).__name__}", file=file)
        fields = [f.name for f in dataclasses.fields(DatasetStatistics)]
        for k in fields:
            if k not in d:
                raise DataError("missing", file=file, key=k)
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise DataError(f"unknown entries {unknown} (known: {', '.join(fields)})", file=file)
        d = dict(d)
        d["species"] = tuple(_atomic_number(z, file) for z in _listed(d["species"], "species", file))
        energies = d["atomic_energies"]
        if not isinstance(energies, dict):
            raise DataError(f"must map atomic numbers to energies, got {energies!r}", file=file, key="atomic_energies")
        d["atomic_energies"] = {_atomic_number(k, file, "atomic_energies"): _number(v, "atomic_energies", file)
                                for k, v in energies.items()}
        for k in ("energy_per_atom_mean", "energy_per_atom_std", "force_rms", "avg_num_neighbors", "cutoff"):
            d[k] = _number(d[k], k, file)
        for k in ("energy_per_atom_std", "avg_num_neighbors"):
            if d[k] < 0:
                raise DataError(f"must be >= 0, got {d[k]}", file=file, key=k)
        for k in ("force_rms", "cutoff"):  # the output scale and the model's cutoff: zero is as wrong as negative
            if d[k] <= 0:
                raise DataError(f"must be > 0, got {d[k]}", file=file, key=k)
        if isinstance(d["n_frames"], bool) or not isinstance(d["n_frames"], numbers.Integral) or d["n_frames"] < 0:
            raise DataError(f"must be a non-negative integer, got {d['n_frames']!r}", file=file, key="n_frames")
        return DatasetStatistics(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def _listed(v, key: str, file) -> list:
    if not isinstance(v, (list, tuple)):
        raise DataError(f"must be a list, got {v!r}", file=file, key=key)
    return v


def _atomic_number(z, file, key: str = "species") -> int:
    """An atomic number (JSON object keys are strings: '8' is fine, 'O' is not)."""
    try:
        n = int(z) if not isinstance(z, (bool, float)) else None
    except (TypeError, ValueError):
        n = None
    if n is None or not 1 <= n <= 118:
        raise DataError(f"{z!r} is not an atomic number (1-118)", file=file, key=key)
    return n


def _number(v, key: str, file) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v):
        raise DataError(f"must be a finite number, got {v!r}", file=file, key=key)
    return float(v)


def composition_matrix(frames: Frames, species) -> np.ndarray:
    """[F, S] counts of each species in each frame."""
    species = np.asarray(species)
    col = np.searchsorted(species, frames.numbers)
    if (species[np.clip(col, 0, len(species) - 1)] != frames.numbers).any():
        raise DataError("frames contain species not in the given species list", key="numbers")
    counts = np.zeros((len(frames), len(species)))
    np.add.at(counts, (frames.frame_index, col), 1)
    return counts


def atomic_energies_lstsq(frames: Frames, species=None) -> dict[int, float]:
    """Least-squares E0 per species. With one composition only (e.g. MD17) the system is rank deficient
    and numpy's minimum-norm solution is returned, as in MACE."""
    if frames.energy is None:
        raise DataError("frames have no energy labels; cannot fit reference energies", key="energy")
    species = np.unique(frames.numbers) if species is None else np.asarray(sorted(species))
    A = composition_matrix(frames, species)
    e0, *_ = np.linalg.lstsq(A, frames.energy, rcond=None)
    return {int(z): float(e) for z, e in zip(species, e0)}


def compute_statistics(frames: Frames, cutoff: float, graphs=None) -> DatasetStatistics:
    """Statistics of a training split; pass precomputed `FrameGraphs` at `cutoff` to skip the neighbour search."""
    if len(frames) == 0:
        raise DataError("cannot compute statistics of an empty split")
    species = np.unique(frames.numbers)
    e0 = atomic_energies_lstsq(frames, species) if frames.energy is not None else {int(z): 0.0 for z in species}
    if frames.energy is not None:
        A = composition_matrix(frames, species)
        resid = (frames.energy - A @ np.array([e0[int(z)] for z in species])) / frames.n_atoms
        mean, std = float(resid.mean()), float(resid.std())
    else:
        mean, std = 0.0, 1.0
    force_rms = float(np.sqrt(np.mean(frames.forces**2))) if frames.forces is not None else 1.0
    if graphs is None:
        from .graph import build_graphs

        graphs = build_graphs(frames, cutoff)
    elif abs(graphs.cutoff - cutoff) > 1e-12:
        raise ValueError(f"graphs were built at cutoff {graphs.cutoff}, statistics asked for {cutoff}")
    avg_nn = float(graphs.n_edges.sum() / frames.n_atoms.sum())
    return DatasetStatistics(
        species=tuple(int(z) for z in species),
        atomic_energies=e0,
        energy_per_atom_mean=mean,
        energy_per_atom_std=std,
        force_rms=force_rms,
        avg_num_neighbors=avg_nn,
        cutoff=float(cutoff),
        n_frames=len(frames),
    )
