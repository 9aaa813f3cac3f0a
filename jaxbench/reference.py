"""The reference frames of the structure metrics when there is no oracle: a dataset split at the
protocol's temperature.

    reference_split(dataset, protocol)              -> split name, or None (no frames at that temperature)
    reference_frames(dataset, split, n_atoms)       -> (positions [T, N, 3], cells [T, 3, 3]), or (None, None)

The first chooses which frames are an honest equilibrium sample of the simulated state point (never
frames from another temperature); the second loads them in the shape the histograms need.
"""

from __future__ import annotations

import numpy as np


def reference_split(dataset: str, protocol, data_dir=None) -> str | None:
    """Frames at the protocol's temperature: 3BPA's test sets are named by temperature; None when the
    dataset has no frames at that temperature."""
    from . import data, md

    proto = protocol if isinstance(protocol, md.Protocol) else md.load_protocol(protocol, dataset)
    spec = data.get(dataset, data_dir=data_dir)
    t = int(round(proto.temperature_K))
    named = f"test_{t}K"
    if named in spec.splits:
        return named
    temps = spec.simulation.get("temperature_K") or []
    temps = temps if isinstance(temps, list) else [temps]
    if temps and t != int(round(float(temps[0]))) and not dataset.startswith("lips20"):
        return None  # the dataset has no frames at this temperature
    return "test"


def positions_of_frames(frames) -> np.ndarray | None:
    """Positions [T, N, 3] of frames that all have the same number of atoms, else None."""
    n = np.asarray(frames.n_atoms)
    if len(n) == 0 or not np.all(n == n[0]):
        return None
    return np.asarray(frames.positions).reshape(len(n), int(n[0]), 3)


def reference_frames(dataset, split, n_atoms, data_dir=None):
    """Reference frames from a dataset split: ``(positions [T, N, 3], cells [T, 3, 3])``, or
    ``(None, None)`` when the split's frames do not all have the ``n_atoms`` simulated atoms."""
    from . import data

    frames = data.load(dataset, split, data_dir=data_dir)
    pos = positions_of_frames(frames)
    if pos is None or pos.shape[1] != n_atoms:
        return None, None
    return pos, np.asarray(frames.cell)
