"""Reference datasets: cards, data directory, fetch / verify, and `load(name, split)`.

A dataset card (`data/<name>.yaml`) names every file by its upstream relative path with its sha256, the
reader format, units, whether the system is a molecule or periodic, the paper's MD temperature and
timestep, and the splits (which files, which frame ranges). The data directory mirrors the upstream
layout (`<data_dir>/Datasets/...`), so a local mirror of the upstream release can itself serve as a
data directory or as a source to fetch from.

Data directory: argument `data_dir`, else env `JAXBENCH_DATA_DIR`, else a per-user cache directory.
Mirror: argument `mirror`, else env `JAXBENCH_DATA_MIRROR`; without one, files come from the card's
upstream URL.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import numbers
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import cards as _cards
from .errors import ChecksumError, DataError
from .frames import Frames

ENV_DATA_DIR = "JAXBENCH_DATA_DIR"
ENV_MIRROR = "JAXBENCH_DATA_MIRROR"


# ---------------------------------------------------------------------------------------------
# Dataset specifications from cards
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """One readable unit (an npz file or a DeePMD directory) and the files it consists of."""

    id: str
    format: str
    path: str
    files: tuple[tuple[str, str], ...]  # (relative path, sha256)
    frames: int
    atoms: int | tuple[int, ...]  # atoms per frame (a tuple of the sizes when frames differ in size)
    elements: tuple[str, ...]
    pbc: bool | None = None  # overrides the file's flags when set (molecules in fake boxes)
    group: str | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    family: str
    periodic: bool
    sources: dict[str, Source]
    splits: dict[str, tuple[tuple[str, slice], ...]]
    simulation: dict[str, Any]
    units: dict[str, str]
    url: str
    notes: str
    card_path: str
    # {split, frame_interval_fs} when one split is a contiguous, time-ordered trajectory (else None)
    trajectory: dict | None = None
    # generated data: {generator, frames, seed, ...} (a card written by `jaxbench.generate`, or a packaged
    # card's `generated_from`, resolved against the data directory by `get`)
    generated: dict | None = None
    # packaged card over generated frames whose files are not resolved yet (no generated card found)
    unresolved: bool = False

    @property
    def files(self) -> list[tuple[str, str]]:
        seen, out = set(), []
        for s in self.sources.values():
            for p, h in s.files:
                if p not in seen:
                    seen.add(p)
                    out.append((p, h))
        return out

    @property
    def elements(self) -> list[str]:
        from ase.data import atomic_numbers

        return sorted({e for s in self.sources.values() for e in s.elements}, key=lambda e: atomic_numbers[e])

    def split_frames(self, split: str) -> int:
        return sum(len(range(*sl.indices(self.sources[src].frames))) for src, sl in self.splits[split])

    def split_atoms(self, split: str) -> list[int]:
        return sorted({n for src, _ in self.splits[split] for n in _sizes(self.sources[src].atoms)})

    @property
    def atoms(self) -> list[int]:
        return sorted({n for s in self.sources.values() for n in _sizes(s.atoms)})


def _sizes(atoms) -> tuple[int, ...]:
    return tuple(atoms) if isinstance(atoms, tuple) else (atoms,)


def _parse_frames(spec, card_path: str, where: str) -> slice:
    if spec is None:
        return slice(None)
    if isinstance(spec, int):
        return slice(spec, spec + 1)
    try:
        parts = [int(p) if p.strip() else None for p in str(spec).split(":")]
        if len(parts) not in (2, 3):
            raise ValueError
        return slice(*parts)
    except ValueError:
        raise DataError(f"frame range {spec!r} is not 'start:stop[:step]'", file=card_path, key=where) from None


def _mapping(value, card_path: str, key: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"must be a mapping, got {type(value).__name__} {value!r}", file=card_path, key=key)
    return value


def _count(value, card_path: str, key: str) -> int:
    """A positive whole number of a card (frames, atoms): anything else is a typo, not a count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DataError(f"must be a positive integer, got {value!r}", file=card_path, key=key)
    return int(value)


def _elements(value, card_path: str, key: str) -> tuple[str, ...]:
    from ase.data import atomic_numbers

    if not isinstance(value, list):
        raise DataError(f"must be a list of element symbols, got {value!r}", file=card_path, key=key)
    for e in value:
        if not isinstance(e, str) or atomic_numbers.get(e, 0) < 1:
            raise DataError(f"{e!r} is not an element symbol", file=card_path, key=key)
    return tuple(value)


def _files(value, card_path: str, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"must be a non-empty list of {{path, sha256}}, got {value!r}", file=card_path, key=key)
    for f in value:
        if not isinstance(f, dict) or not all(isinstance(f.get(k), str) for k in ("path", "sha256")):
            raise DataError(f"entry {f!r} needs a 'path' and a 'sha256' (strings)", file=card_path, key=key)
    return tuple((f["path"], f["sha256"]) for f in value)


def _source_from_card(sid: str, s: dict, card_path: str, generated_from: dict | None = None) -> Source:
    where = f"sources.{sid}"
    s = _mapping(s, card_path, where)
    if generated_from is not None:  # format, path and files come from the generated card (see `get`)
        ds = generated_dataset_name(generated_from, card_path)
        s = {"format": "generated", "path": f"generated/{ds}.yaml", "files": [{"path": f"generated/{ds}.yaml", "sha256": ""}], **s}
    for k in ("format", "path", "files", "frames", "atoms", "elements"):
        if k not in s:
            raise DataError(f"source '{sid}' lacks '{k}'", file=card_path, key=f"{where}.{k}")
    atoms = s["atoms"]
    return Source(
        id=sid,
        format=s["format"],
        path=s["path"],
        files=_files(s["files"], card_path, f"{where}.files"),
        frames=_count(s["frames"], card_path, f"{where}.frames"),
        atoms=(tuple(_count(a, card_path, f"{where}.atoms") for a in atoms) if isinstance(atoms, list)
               else _count(atoms, card_path, f"{where}.atoms")),
        elements=_elements(s["elements"], card_path, f"{where}.elements"),
        pbc=s.get("pbc"),
        group=s.get("group"),
    )


# Quantities of a card's `simulation:` block (a number or a list of numbers each): physical, so > 0.
SIMULATION_QUANTITIES = ("temperature_K", "timestep_fs", "frame_interval_fs")


def _check_simulation(sim, card_path: str) -> dict:
    sim = _mapping(sim, card_path, "simulation")
    for k in SIMULATION_QUANTITIES:
        raw = sim.get(k)
        for v in raw if isinstance(raw, list) else [] if raw is None else [raw]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise DataError(f"must be a positive number (or a list of them), got {raw!r}", file=card_path,
                                key=f"simulation.{k}")
    return sim


def _specs_from_card(card: dict) -> list[DatasetSpec]:
    path = card["_path"]
    gen_from = card.get("generated_from")
    raw_sources = _mapping(card.get("sources", {}), path, "sources")
    sources = {sid: _source_from_card(sid, s, path, gen_from) for sid, s in raw_sources.items()}
    if not sources:
        raise DataError("card has no sources", file=path, key="sources")

    def splits_of(raw: dict) -> dict[str, tuple[tuple[str, slice], ...]]:
        out = {}
        for split, entries in _mapping(raw, path, "splits").items():
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise DataError(f"split '{split}' must be a list of {{source, frames}} entries, got {entries!r}",
                                file=path, key=f"splits.{split}")
            items = []
            for e in entries:
                if e.get("source") not in sources:
                    raise DataError(f"split '{split}' names unknown source {e.get('source')!r}", file=path, key=f"splits.{split}")
                items.append((e["source"], _parse_frames(e.get("frames"), path, f"splits.{split}")))
            out[split] = tuple(items)
        return out

    common = dict(
        family=card.get("family", card["name"]),
        periodic=card.get("kind") == "periodic",
        simulation=_check_simulation(card.get("simulation", {}), path),
        trajectory=card.get("trajectory"),
        units=card.get("units", {}),
        url=card.get("source", {}).get("url", ""),
        notes=card.get("notes", ""),
        card_path=path,
        generated=gen_from or card.get("generated"),
        unresolved=gen_from is not None,
    )
    specs = [
        DatasetSpec(name=card["name"], title=card.get("title", card["name"]), sources=sources,
                    splits=splits_of(card.get("splits", {})), **common)
    ]
    per = card.get("per_source")
    if per:
        for sid, src in sources.items():
            raw = {sp: [{"source": sid, "frames": fr}] for sp, fr in per["splits"].items()}
            raw["all"] = [{"source": sid}]
            specs.append(
                DatasetSpec(
                    name=per["name"].format(source=sid),
                    title=f"{card.get('title', card['name'])} {sid}",
                    sources={sid: src},
                    splits=splits_of(raw),
                    **common,
                )
            )
    return specs


def generated_dataset_name(ref: dict, card_path: str = "") -> str:
    """Name of the generated dataset a `generated_from: {generator, frames, seed}` refers to
    (the same as `jaxbench.generate.dataset_name`)."""
    for k in ("generator", "frames", "seed"):
        if k not in ref:
            raise DataError(f"generated_from lacks '{k}'", file=card_path, key=f"generated_from.{k}")
    return f"{ref['generator']}-n{int(ref['frames'])}-s{int(ref['seed'])}"


@functools.lru_cache(maxsize=None)
def all_specs() -> dict[str, DatasetSpec]:
    """Every dataset of the packaged (and added) cards, by name; generated datasets in a data directory
    are in `datasets(data_dir)`."""
    out: dict[str, DatasetSpec] = {}
    for card in _cards.cards("data").values():
        for spec in _specs_from_card(card):
            if spec.name in out:
                raise DataError(f"dataset name '{spec.name}' defined twice", file=card["_path"])
            out[spec.name] = spec
    return out


def generated_specs(data_dir: str | os.PathLike | None = None) -> dict[str, DatasetSpec]:
    """Datasets written by `jaxbench.generate` into the data directory (`<data_dir>/generated/*.yaml`)."""
    d = resolve_data_dir(data_dir) / "generated"
    out: dict[str, DatasetSpec] = {}
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.yaml")):
        for spec in _specs_from_card(_cards.read_card(p)):
            out[spec.name] = spec
    return out


def clear_caches() -> None:
    """Forget cached cards, specs and read sources (after writing a card or a dataset)."""
    _cards.clear_caches()
    _read_source_cached.cache_clear()


def datasets(data_dir: str | os.PathLike | None = None, generated: bool | str = False) -> dict[str, DatasetSpec]:
    """Datasets by name. ``generated=False`` (default): the downloadable ones (upstream files);
    ``"present"``: also the generated ones whose card is in the data directory (packaged cards over
    generated frames, resolved, and the generated cards themselves); ``True``: also every packaged
    card over generated frames, present or not."""
    specs = all_specs()
    out = {k: v for k, v in specs.items() if v.generated is None}
    if not generated:
        return out
    for k, v in specs.items():
        if v.generated is not None:
            r = get(k, data_dir)
            if generated is True or not r.unresolved:
                out[k] = r
    for k, v in generated_specs(data_dir).items():
        out.setdefault(k, v)
    return out


def _resolve_generated(spec: DatasetSpec, data_dir) -> DatasetSpec:
    """A packaged card over generated frames, with its sources' format/path/files from the generated card."""
    ds = generated_dataset_name(spec.generated, spec.card_path)
    gen = generated_specs(data_dir).get(ds)
    if gen is None:
        return spec
    # A packaged card may pin generator parameters its metadata depends on (e.g. the frame spacing that its
    # `simulation:` block states): frames generated otherwise are not the card's data.
    made = (gen.generated or {}).get("parameters", {})
    for k, want in (spec.generated.get("parameters") or {}).items():
        if made.get(k) != want:
            raise DataError(f"generated dataset '{ds}' was made with {k}={made.get(k)!r}, this card describes {k}={want!r}: "
                            + generate_hint(spec, Path(gen.card_path).parent.parent),
                            file=spec.card_path, key=f"generated_from.parameters.{k}")
    src = gen.sources["all"]
    sources = {}
    for sid, s in spec.sources.items():
        if s.frames > src.frames:
            raise DataError(f"source '{sid}' needs {s.frames} frames, generated dataset '{ds}' has {src.frames}",
                            file=spec.card_path, key=f"sources.{sid}.frames")
        sources[sid] = dataclasses.replace(src, id=sid, frames=src.frames)
    return dataclasses.replace(spec, sources=sources, unresolved=False,
                               generated={**spec.generated, **(gen.generated or {}), "card": gen.card_path})


def get(name: str, data_dir: str | os.PathLike | None = None) -> DatasetSpec:
    """The dataset called `name` (case-insensitive); unknown names raise with close suggestions.

    Generated datasets are looked up in the data directory; a packaged card over generated frames
    (`generated_from:`) gets its files from the generated card there."""
    specs = all_specs()
    if name not in specs and name.lower() not in {k.lower() for k in specs}:
        specs = {**generated_specs(data_dir), **specs}
    spec = specs[_cards.lookup("data", name, specs)]
    if spec.unresolved:
        spec = _resolve_generated(spec, data_dir)
    return spec


def generate_hint(spec: DatasetSpec, root: Path) -> str:
    g = spec.generated or {}
    params = "".join(f" --param {k}={v}" for k, v in (g.get("parameters") or {}).items())
    return (f"generate it: `jaxbench data generate {g.get('generator')} --frames {g.get('frames')} --seed {g.get('seed', 0)}"
            f"{params} --data-dir {root}`")


# ---------------------------------------------------------------------------------------------
# Data directory, fetch, verify
# ---------------------------------------------------------------------------------------------
def resolve_data_dir(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("jaxbench")) / "data"


def resolve_mirror(path: str | os.PathLike | None = None) -> Path | None:
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(ENV_MIRROR):
        return Path(os.environ[ENV_MIRROR]).expanduser()
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=4096)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached in-process by (path, size, mtime) so repeated loads hash once."""
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@dataclasses.dataclass
class FileStatus:
    dataset: str
    path: str
    sha256: str
    state: str  # "ok", "missing", "mismatch"
    actual: str | None = None


def check_files(name: str, root: str | os.PathLike | None = None, hash_files: bool = True) -> list[FileStatus]:
    spec = get(name, root)
    root = resolve_data_dir(root)
    out = []
    for rel, sha in spec.files:
        p = root / rel
        if not p.is_file():
            out.append(FileStatus(spec.name, rel, sha, "missing"))
        elif hash_files:
            actual = file_sha256(p)
            out.append(FileStatus(spec.name, rel, sha, "ok" if actual == sha else "mismatch", actual))
        else:
            out.append(FileStatus(spec.name, rel, sha, "present"))
    return out


def _copy_verified(
    opener: Callable[[], Any], dest: Path, sha: str, origin: str, progress: Callable[[int], None] | None
) -> None:
    """Stream `opener()` into a temp file beside `dest`, verify sha256, then rename atomically.

    On any failure the temp file is removed and `dest` is left untouched: no partial output.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, opener() as src:
            while block := src.read(1 << 20):
                h.update(block)
                out.write(block)
                if progress:
                    progress(len(block))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != sha:
            raise ChecksumError(
                f"sha256 {h.hexdigest()} does not match the card's {sha} (copied from {origin}); nothing was written",
                file=str(dest),
            )
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def fetch(
    names: Iterable[str],
    data_dir: str | os.PathLike | None = None,
    mirror: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[FileStatus]:
    """Make every file of the named datasets present and verified in the data directory.

    Files already present with the right sha256 are skipped. Sources, in order: a local mirror laid out
    like upstream (`mirror` or env `JAXBENCH_DATA_MIRROR`), else the card's upstream URL (`base_url`
    overrides its prefix, e.g. for an HTTP mirror: `{base_url}/{path}`).
    """
    root = resolve_data_dir(data_dir)
    mirror_path = resolve_mirror(mirror)
    todo: dict[str, tuple[str, str, str]] = {}
    results = []
    for name in names:
        spec = get(name, root)
        for st in check_files(spec.name, root):
            if st.state == "ok":
                results.append(st)
            elif spec.generated is not None:
                raise DataError(f"dataset '{spec.name}' is generated, not downloaded ({st.state}: {st.path}); "
                                + generate_hint(spec, root), file=str(root / st.path))
            elif st.path not in todo:
                url = f"{base_url.rstrip('/')}/{st.path}" if base_url else spec.url.format(path=st.path)
                todo[st.path] = (st.sha256, url, spec.name)
    if not todo:
        return results
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="file", desc="fetch", leave=False)
    try:
        for rel, (sha, url, dsname) in todo.items():
            dest = root / rel
            if mirror_path is not None:
                src = mirror_path / rel
                if not src.is_file():
                    raise DataError(f"mirror has no file {rel} (needed by dataset {dsname})", file=str(src))
                _copy_verified(lambda src=src: open(src, "rb"), dest, sha, str(src), None)
            else:
                try:
                    _copy_verified(lambda url=url: urllib.request.urlopen(url, timeout=60), dest, sha, url, None)
                except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                    raise DataError(
                        f"cannot download {url}: {getattr(e, 'reason', e)}. Nothing was written. Without network "
                        f"access, point --mirror / ${ENV_MIRROR} at a local copy laid out like upstream",
                        file=str(dest),
                    ) from None
            if log:
                log(f"fetched {rel}")
            results.append(FileStatus(dsname, rel, sha, "ok", sha))
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    return results


def verify(names: Iterable[str] | None = None, data_dir: str | os.PathLike | None = None) -> list[FileStatus]:
    """Re-hash every present file of the named datasets (all if None); report ok / mismatch / missing."""
    _sha256_cached.cache_clear()
    names = list(names) if names is not None else list(datasets(data_dir, generated="present"))
    seen, out = set(), []
    for name in names:
        for st in check_files(name, data_dir):
            if st.path not in seen:
                seen.add(st.path)
                out.append(st)
    return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _read_source(src: Source, root: Path, spec: DatasetSpec) -> Frames:
    from . import io

    path = root / src.path
    if src.format == "nequip-npz":
        pbc = None if src.pbc is None else np.full(3, bool(src.pbc))
        frames = io.read_nequip_npz(path, pbc=pbc)
    elif src.format == "deepmd":
        frames = io.read_deepmd(path)
    elif src.format in ("extxyz", "ase"):
        frames = io.read_ase(path)
    else:
        raise DataError(f"unknown format {src.format!r}", file=spec.card_path, key=f"sources.{src.id}.format")
    if len(frames) != src.frames:
        raise DataError(f"has {len(frames)} frames, the card says {src.frames}", file=str(path))
    return frames


@functools.lru_cache(maxsize=8)
def _read_source_cached(name: str, sid: str, root: str, sha: tuple = ()) -> Frames:
    spec = get(name, root)
    return _read_source(spec.sources[sid], Path(root), spec)


_cards.on_clear(all_specs.cache_clear)


def load(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    mirror: str | os.PathLike | None = None,
) -> Frames:
    """Frames of one split of a dataset, with the card's metadata in `frames.info`.

    Missing files are fetched first when `download` (from the mirror if one is configured, else the
    upstream URL); every file read is checked against the card's sha256.
    """
    spec = get(name, data_dir)
    if split not in spec.splits:
        from .errors import UnknownNameError

        raise UnknownNameError(f"split of dataset '{spec.name}'", split, spec.splits)
    root = resolve_data_dir(data_dir)
    needed = {sid for sid, _ in spec.splits[split]}
    files = [(rel, sha) for sid in needed for rel, sha in spec.sources[sid].files]
    missing = [rel for rel, _ in files if not (root / rel).is_file()]
    if missing and spec.generated is not None:
        raise DataError(f"generated dataset '{spec.name}' is not in the data directory ({missing[0]} missing); "
                        + generate_hint(spec, root), file=str(root / missing[0]))
    if missing:
        if not download:
            raise DataError(
                f"dataset '{spec.name}' is not in the data directory ({len(missing)} files missing, e.g. {missing[0]}); "
                f"run `jaxbench data fetch {spec.name}`",
                file=str(root / missing[0]),
            )
        fetch([spec.name], root, mirror=mirror, progress=False)
    for rel, sha in files:
        actual = file_sha256(root / rel)
        if actual != sha:
            raise ChecksumError(
                f"sha256 {actual} does not match the card's {sha}; the file is corrupt or was changed "
                f"(delete it and run `jaxbench data fetch {spec.name}`)",
                file=str(root / rel),
            )
    parts = []
    for sid, sl in spec.splits[split]:
        frames = _read_source_cached(spec.name, sid, str(root.resolve()), spec.sources[sid].files)
        parts.append(frames[sl] if sl != slice(None) else frames)
    out = Frames.concatenate(parts) if len(parts) > 1 else parts[0]
    return out.with_info(
        dataset=spec.name,
        split=split,
        title=spec.title,
        periodic=spec.periodic,
        units=dict(spec.units),
        simulation=dict(spec.simulation),
        sources=[sid for sid, _ in spec.splits[split]],
        **({"generated": dict(spec.generated)} if spec.generated else {}),
    )


def dataset_table(root: str | os.PathLike | None = None, hash_files: bool = True) -> list[dict[str, Any]]:
    """One row per dataset: frames per split, atoms, elements, periodic, presence and verification."""
    rows = []
    for name, spec in datasets(root, generated="present").items():
        st = check_files(name, root, hash_files=hash_files)
        present = all(s.state != "missing" for s in st)
        verified = all(s.state == "ok" for s in st) if hash_files else None
        rows.append(
            dict(
                name=name,
                title=spec.title,
                frames={sp: spec.split_frames(sp) for sp in spec.splits},
                atoms=spec.atoms,
                elements=spec.elements,
                periodic=spec.periodic,
                temperature_K=spec.simulation.get("temperature_K"),
                timestep_fs=spec.simulation.get("timestep_fs"),
                files=len(st),
                present=present,
                verified=verified,
            )
        )
    return rows
