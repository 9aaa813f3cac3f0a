"""Generator registry and the `Generated` record (a module of its own so that the generator modules
import it without importing the package that imports them)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

@dataclasses.dataclass
class Generated:
    """What a generator returns: labelled frames (arrays in Å, eV, eV/Å, eV/Å³) and their description."""

    positions: list[np.ndarray]  # per frame [N, 3]
    numbers: list[np.ndarray]  # per frame [N]
    cells: list[np.ndarray]  # per frame [3, 3] (zeros: no cell)
    pbc: list[np.ndarray]  # per frame [3]
    energy: np.ndarray  # [F]
    forces: list[np.ndarray]  # per frame [N, 3]
    stress: list[np.ndarray] | None  # per frame [3, 3] or None
    force_field: str
    engine: str
    params: dict[str, Any]
    simulation: dict[str, Any]
    kind: str  # "molecule" or "periodic"
    notes: str
    frame_interval_fs: float | None = None  # time-ordered trajectory with this spacing, else None
    groups: list[str] | None = None  # per-frame label (composition, temperature, ...), informational


@dataclasses.dataclass(frozen=True)
class Generator:
    name: str
    fn: Callable[..., Generated]
    default_frames: int
    title: str


GENERATORS: dict[str, Generator] = {}


def register(name: str, default_frames: int, title: str):
    def deco(fn):
        GENERATORS[name] = Generator(name, fn, default_frames, title)
        return fn

    return deco
