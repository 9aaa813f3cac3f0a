"""Reading the declarative benchmark definition: YAML cards in `data/`, `models/` and `sims/`.

The repository keeps the cards at its top level; `pyproject.toml` ships them inside the package as
`jaxbench._cards.<kind>`, so an installed jaxbench (editable or not) finds the same files.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Any

import yaml

from .errors import DataError, UnknownNameError

KINDS = ("data", "models", "sims")
# Users' own card folders (each may hold data/, models/, sims/ subfolders), searched after the
# packaged cards: `$JAXBENCH_CARDS` (os.pathsep-separated) and `add_path()`.
ENV_CARDS = "JAXBENCH_CARDS"
_EXTRA_PATHS: list[Path] = []


def add_path(path: str | Path) -> None:
    """Also read cards from `path`/{data,models,sims} (e.g. a generated dataset's card)."""
    path = Path(path).expanduser().resolve()
    if path not in _EXTRA_PATHS:
        _EXTRA_PATHS.append(path)
    clear_caches()


# Callbacks run by `clear_caches` (modules above this one, e.g. `jaxbench.data`, register their own
# card-derived caches here, so this module never imports them).
_CLEAR_HOOKS: list = []


def on_clear(fn) -> None:
    """Call `fn()` whenever the card caches are cleared (`add_path`, `clear_caches`)."""
    if fn not in _CLEAR_HOOKS:
        _CLEAR_HOOKS.append(fn)


def clear_caches() -> None:
    _cards.cache_clear()
    for fn in list(_CLEAR_HOOKS):
        fn()


def search_dirs(kind: str) -> list[Path]:
    import os

    extra = [Path(p).expanduser() for p in os.environ.get(ENV_CARDS, "").split(os.pathsep) if p.strip()]
    return [card_dir(kind)] + [p / kind for p in extra + _EXTRA_PATHS if (p / kind).is_dir()]


def card_dir(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"card kind must be one of {KINDS}, got {kind!r}")
    try:
        path = Path(str(importlib.resources.files(f"jaxbench._cards.{kind}")))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    # Running from a source tree without installing: the cards sit beside the package.
    return Path(__file__).resolve().parents[1] / kind


def read_yaml(path: str | Path, what: str = "card"):
    """A YAML file's content; unreadable, non-UTF-8 or invalid YAML is a DataError naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise DataError(f"not valid YAML: {e}", file=str(path)) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start}: {e.reason}): a {what} is a UTF-8 YAML file",
                        file=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read {what}: {e.strerror}", file=str(path)) from None


def read_card(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    card = read_yaml(path)
    if not isinstance(card, dict) or "name" not in card:
        raise DataError("a card must be a mapping with a 'name'", file=str(path))
    card["_path"] = str(path)
    return card


@functools.lru_cache(maxsize=None)
def _cards(kind: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in search_dirs(kind):
        for p in sorted(d.glob("*.yaml")):
            card = read_card(p)
            if card["name"] in out:
                raise DataError(f"card name '{card['name']}' is also defined in {out[card['name']]['_path']}", file=str(p))
            out[card["name"]] = card
    return out


def cards(kind: str) -> dict[str, dict[str, Any]]:
    """All cards of a kind, by name (a fresh copy each call; callers may mutate)."""
    import copy

    return copy.deepcopy(_cards(kind))


def lookup(kind: str, name: str, known: dict[str, Any]) -> str:
    """Resolve `name` case-insensitively among `known`; raise `UnknownNameError` with suggestions."""
    if name in known:
        return name
    folded = {k.lower(): k for k in known}
    if name.lower() in folded:
        return folded[name.lower()]
    raise UnknownNameError({"data": "dataset", "models": "model card", "sims": "protocol"}.get(kind, kind), name, known)
