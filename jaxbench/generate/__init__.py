"""Generated reference datasets: a registry of generators, and writing their frames + a dataset card.

A generator is a function ``gen(frames: int, seed: int, **params) -> Generated`` that runs a real
reference engine (OpenMM, ASE EMT) and returns labelled frames plus everything needed to describe
them. :func:`generate` writes the frames atomically (temp file, then rename) into the data directory
as ``Generated/<dataset>/frames.npz`` (one system size; nequip-style keys) or ``frames.extxyz``
(several sizes), hashes what was written, and writes a dataset card
``generated/<dataset>.yaml`` (generator, force field, every parameter, seed, sha256, units,
splits) that :mod:`jaxbench.data` reads like the packaged cards. The dataset name is
``<generator>-n<frames>-s<seed>``; packaged cards (``data/water-1k.yaml`` ...) refer to such a
generation by ``generated: {generator, frames, seed}``.

Generators: ``water-64``, ``water-512`` (OpenMM SPC/Fw), ``alanine-dipeptide`` (OpenMM amber14 +
GBn2), ``hea-emt``, ``surface-emt``, ``bulk-emt-2``, ``bulk-emt-4`` (ASE EMT). The OpenMM ones also
give an oracle: :func:`openmm_oracle`.
"""

from __future__ import annotations

import dataclasses
import io as _stdio
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from ..errors import DataError, UnknownNameError

__all__ = ["Generated", "GENERATORS", "generators", "generate", "dataset_name", "card_path", "write_frames",
           "openmm_oracle", "oracle_for", "add_arguments", "run", "cli_main"]


from .base import GENERATORS, Generated, Generator, register


def generators() -> dict[str, Generator]:
    """Every registered generator by name (importing the engine modules lazily registers them)."""
    from . import emt, openmm_systems  # noqa: F401  (registration side effect)

    return dict(GENERATORS)


def get_generator(name: str) -> Generator:
    gens = generators()
    if name not in gens:
        raise UnknownNameError("generator", name, gens)
    return gens[name]


def dataset_name(generator: str, frames: int, seed: int) -> str:
    return f"{generator}-n{int(frames)}-s{int(seed)}"


def card_path(root: Path, dataset: str) -> Path:
    """Where the card of a generated dataset lives in the data directory."""
    return Path(root) / "generated" / f"{dataset}.yaml"


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A nequip-style npz, byte-reproducible (fixed zip timestamps, fixed key order)."""
    buf = _stdio.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for k in sorted(arrays):
            info = zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            a = _stdio.BytesIO()
            np.lib.format.write_array(a, np.ascontiguousarray(arrays[k]), allow_pickle=False)
            z.writestr(info, a.getvalue())
    return buf.getvalue()


def write_frames(g: Generated, directory: Path) -> tuple[Path, str]:
    """Write `g`'s frames into `directory` atomically; returns (path, format). One system size: a
    nequip-style npz (``pos``, ``atomic_numbers``, ``energy``, ``forces``, ``cell``, ``pbc``,
    ``stress``); several sizes: exact extxyz (:func:`jaxbench.io.write_extxyz`)."""
    sizes = {len(n) for n in g.numbers}
    same_species = len(sizes) == 1 and all(np.array_equal(n, g.numbers[0]) for n in g.numbers)
    same_pbc = all(np.array_equal(p, g.pbc[0]) for p in g.pbc)
    if same_species and same_pbc:
        arrays = dict(
            pos=np.stack(g.positions).astype(np.float64),
            atomic_numbers=np.asarray(g.numbers[0], np.int64),
            energy=np.asarray(g.energy, np.float64),
            forces=np.stack(g.forces).astype(np.float64),
            cell=np.stack(g.cells).astype(np.float64),
            pbc=np.asarray(g.pbc[0], bool),
        )
        if g.stress is not None:
            arrays["stress"] = np.stack(g.stress).astype(np.float64)
        path = directory / "frames.npz"
        _atomic_write_bytes(path, _npz_bytes(arrays))
        return path, "nequip-npz"
    from ..frames import Frames
    from ..io import write_extxyz

    parts = [
        Frames.from_arrays(
            positions=g.positions[i][None], numbers=g.numbers[i], cell=g.cells[i][None], pbc=g.pbc[i],
            energy=[g.energy[i]], forces=g.forces[i][None],
            stress=None if g.stress is None else g.stress[i][None], validate=False,
        )
        for i in range(len(g.energy))
    ]
    path = directory / "frames.extxyz"
    write_extxyz(Frames.concatenate(parts), path, exact=True)
    return path, "extxyz"


def _default_splits(n: int) -> dict[str, list[dict]]:
    a = max(1, min(int(round(0.8 * n)), n - 2))
    b = max(a + 1, min(int(round(0.9 * n)), n - 1))
    if n < 3:
        return {"train": [{"source": "all"}], "val": [{"source": "all"}], "test": [{"source": "all"}]}
    return {"train": [{"source": "all", "frames": f"0:{a}"}], "val": [{"source": "all", "frames": f"{a}:{b}"}],
            "test": [{"source": "all", "frames": f"{b}:{n}"}]}


def _plain(x):
    """Parameters as YAML-safe plain Python (numpy scalars/arrays, tuples)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def generate(
    generator: str,
    frames: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    **params,
) -> dict[str, Any]:
    """Run a generator and write its frames and card into the data directory.

    Returns ``{"dataset", "card", "path", "sha256", "frames", "seconds"}``; afterwards
    ``jaxbench.data.load(result["dataset"], "train", data_dir=...)`` reads it back (and the packaged
    cards that name this generator, frame count and seed resolve to it).
    """
    from .. import data
    from ..data import file_sha256, resolve_data_dir

    gen = get_generator(generator)
    n = int(gen.default_frames if frames is None else frames)
    if n < 1:
        raise DataError(f"frames must be >= 1, got {n}", key="frames")
    root = resolve_data_dir(data_dir)
    name = dataset_name(gen.name, n, seed)
    t0 = time.perf_counter()
    g = gen.fn(frames=n, seed=int(seed), log=log, **params)
    seconds = time.perf_counter() - t0
    if len(g.energy) != n:
        raise DataError(f"generator '{gen.name}' returned {len(g.energy)} frames, {n} asked for", key="frames")
    rel_dir = Path("Generated") / name
    path, fmt = write_frames(g, root / rel_dir)
    sha = file_sha256(path)
    rel = str(rel_dir / path.name)
    elements = sorted({int(z) for nums in g.numbers for z in nums})
    from ase.data import chemical_symbols

    natoms = sorted({len(x) for x in g.numbers})
    card = {
        "name": name,
        "family": gen.name,
        "title": f"{gen.title} (generated: {n} frames, seed {seed})",
        "kind": g.kind,
        "units": {"positions": "Å", "energy": "eV (total)", "forces": "eV/Å", "cell": "Å",
                  **({"stress": "eV/Å^3 (ASE sign)"} if g.stress is not None else {})},
        "generated": {
            "generator": gen.name, "frames": n, "seed": int(seed), "engine": g.engine, "force_field": g.force_field,
            "parameters": _plain(g.params), "seconds": round(seconds, 2),
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "simulation": _plain(g.simulation),
        "sources": {"all": {"format": fmt, "path": rel, "frames": n,
                            "atoms": natoms[0] if len(natoms) == 1 else natoms,
                            "elements": [chemical_symbols[z] for z in elements],
                            "files": [{"path": rel, "sha256": sha}]}},
        "splits": _default_splits(n),
        "notes": g.notes + " Default split: contiguous 80/10/10 % frame ranges.",
    }
    if g.kind == "molecule":
        card["sources"]["all"]["pbc"] = False
    # The test split is a trajectory only when it lies inside one time-ordered run (group): frames of
    # independent chains concatenated are not one time series.
    test_start = int(card["splits"]["test"][0].get("frames", "0:").split(":")[0] or 0)
    one_run = g.groups is None or len(set(g.groups[test_start:])) == 1
    if g.frame_interval_fs and n >= 3 and one_run:
        card["trajectory"] = {"split": "test", "frame_interval_fs": float(g.frame_interval_fs)}
    if g.groups is not None:
        uniq = sorted(set(g.groups))
        card["groups"] = {u: [i for i, x in enumerate(g.groups) if x == u] for u in uniq}
    cpath = card_path(root, name)
    text = yaml.safe_dump(card, sort_keys=False, allow_unicode=True)
    _atomic_write_bytes(cpath, text.encode("utf-8"))
    data.clear_caches()
    if log:
        log(f"wrote {rel} ({n} frames, {seconds:.1f} s) and card {cpath}")
    return {"dataset": name, "card": str(cpath), "path": str(path), "sha256": sha, "frames": n, "seconds": seconds}


def openmm_oracle(name: str, **kw):
    """The reference force field of an OpenMM generator as an oracle (an ASE calculator with an extra
    ``evaluate_frames(positions [T,N,3] Å, cells) -> (energy [T] eV, forces [T,N,3] eV/Å)``); it works
    with :func:`jaxbench.oracle.evaluate_frames` / ``reference_rollout`` like any ASE calculator."""
    from .openmm_systems import oracle

    return oracle(name, **kw)


def oracle_for(generated: dict, **kw):
    """The oracle matching a generated dataset, from its card's ``generated`` section (what
    ``data.load(...).info["generated"]`` or ``data.get(name, data_dir).generated`` holds): same
    generator, cutoff and electrostatics as the frames were labelled with. EMT datasets get ASE's EMT."""
    gen, p = generated["generator"], generated.get("parameters", {})
    if gen.startswith("water-"):
        return openmm_oracle(gen, cutoff_A=p.get("cutoff_A"), electrostatics=p.get("electrostatics"), **kw)
    if gen == "alanine-dipeptide":
        return openmm_oracle(gen, **kw)
    if gen in ("hea-emt", "surface-emt", "bulk-emt-2", "bulk-emt-4"):
        from ase.calculators.emt import EMT

        return EMT()
    raise DataError(f"no oracle for generator {gen!r}", key="generated.generator")


# ---------------------------------------------------------------------------------------------
# CLI: `jaxbench data generate NAME [--frames N] [--seed S] [--data-dir D] [--param k=v ...]`
# ---------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("name", help="generator: " + ", ".join(sorted(generators())))
    parser.add_argument("--frames", type=int, default=None, help="frames to generate (default: the generator's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="data directory (default $JAXBENCH_DATA_DIR or the cache)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="generator parameter (YAML value), e.g. --param temperature_K=350")


def run(args) -> int:
    params = {}
    for kv in args.param or []:
        if "=" not in kv:
            raise DataError(f"--param {kv!r} is not KEY=VALUE", key="--param")
        k, v = kv.split("=", 1)
        params[k.strip()] = yaml.safe_load(v)
    out = generate(args.name, frames=args.frames, seed=args.seed, data_dir=args.data_dir, log=print, **params)
    print(f"dataset {out['dataset']}: {out['frames']} frames in {out['seconds']:.1f} s, sha256 {out['sha256']}")
    print(f"card {out['card']}")
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="jaxbench data generate")
    add_arguments(p)
    return run(p.parse_args(argv))
