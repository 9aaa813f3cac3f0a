"""Dataset statistics that models are built with (computed on the training split only).

- per-species reference energies E0[Z] by least squares, E_frame ~ sum_Z n_Z(frame) E0[Z];
- the residual (interaction) energy per atom: mean and standard deviation (the usual shift / scale);
- force RMS (the usual scale of NequIP / MACE outputs);
- mean number of neighbours within the model cutoff (normalises message sums in NequIP and MACE).
"""

from __future__ import annotations

import dataclasses
import json
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
    def from_json(d: dict[str, Any]) -> "DatasetStatistics":
        d = dict(d)
        d["atomic_energies"] = {int(k): float(v) for k, v in d["atomic_energies"].items()}
        d["species"] = tuple(int(z) for z in d["species"])
        return DatasetStatistics(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


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
