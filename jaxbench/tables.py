"""Table cells: numbers formatted for reports, and the project's copy of the papers' published values
(`jaxbench/paper/published.json`, read at run time instead of `../shared`)."""

from __future__ import annotations

import functools
import json
from typing import Any


@functools.lru_cache(maxsize=1)
def published() -> dict[str, Any]:
    from importlib import resources

    with resources.files("jaxbench.paper").joinpath("published.json").open() as f:
        return json.load(f)


def fmt(x, digits=3) -> str:
    """A number for a table: 3 significant digits, "—" for none."""
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{max(digits - len(str(int(abs(x)))), 0) + 1}f}".rstrip("0").rstrip(".")


def mean_std(stat: dict | None, scale: float = 1.0) -> str:
    """A replica_stats entry as "mean (std)", scaled, "—" when no replica has a value."""
    if not stat or stat.get("mean") is None:
        return "—"
    s = fmt(stat["mean"] * scale)
    return s + (f" ({fmt(stat['std'] * scale)})" if stat.get("std") is not None else "")
