"""The bad-input suite (issue 19): every reader and card parser fed systematically broken inputs.

One table, `CASES`: each case builds one broken input under tmp_path, calls one reader, and lists the
substrings the error message must contain (the file's name and, where it applies, the key, frame and
atom at fault). Every case must raise a `JaxbenchError` subclass, never a raw KeyError / OSError /
numpy / h5py / YAML error: a user reads the message and goes straight to the faulty record.

The inputs are small (slices of real reference data through the helpers of test_io, a 3-atom water
extxyz, a 4-atom argon start, tiny HDF5 files): nothing is compiled, trained or simulated.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import h5py
import numpy as np
import pytest
import yaml

from jaxbench import cards, data, io, md, potential, runs, trajectory
from jaxbench.errors import JaxbenchError
from jaxbench.md.start import check_start
from jaxbench.train.config import TrainingConfig
from jaxbench.train.setup import read_model

from .test_io import deepmd_copy, ethanol_arrays, periodic_arrays, write_npz
from .test_md import argon
from .test_trajectory import _small_start


class Case(NamedTuple):
    id: str
    reader: str
    build: Callable[[Path], Any]  # builds the bad input under tmp_path and calls the reader
    expect: tuple[str, ...]  # substrings of the error message


DROP = object()  # an `edit` value: delete the key


def edit(base: dict, changes: dict[str, Any]) -> dict:
    """A deep copy of `base` with dotted keys ('sources.all.frames') set (or deleted with DROP)."""
    out = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = out
        for k in parents:
            node = node[k]
        if value is DROP:
            del node[last]
        else:
            node[last] = value
    return out


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def write(path: Path, content) -> Path:
    """`content` as a file: bytes and str as they are, anything else as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------
# extxyz through `io.read` (ASE): frame 0 is good, frame 1 carries the fault
# ------------------------------------------------------------------------------------------------
XYZ = "io.read (extxyz)"
WATER = ["O 0.0 0.0 0.0 0.1 0.0 0.0", "H 0.96 0.0 0.0 -0.05 0.0 0.0", "H -0.24 0.93 0.0 -0.05 0.0 0.0"]
PROPS = "species:S:1:pos:R:3:forces:R:3"
BOX = 'Lattice="6.0 0.0 0.0 0.0 6.0 0.0 0.0 0.0 6.0" '


def xyz_frame(rows=WATER, energy="-14.2", lattice="", pbc="F F F", props=PROPS, count=None) -> str:
    energy = f" energy={energy}" if energy is not None else ""
    return f"{len(rows) if count is None else count}\n{lattice}Properties={props}{energy} pbc=\"{pbc}\"\n" + "\n".join(rows) + "\n"


def row(k: int, text: str) -> list[str]:
    """WATER with atom k's line replaced."""
    return [text if i == k else r for i, r in enumerate(WATER)]


def xyz(name: str, bad: str | bytes | None = None, raw: str | bytes | None = None):
    """Builder: a good first frame followed by `bad` (or the file `raw` as it is), read with `io.read`."""

    def build(tmp_path):
        io.read(write(tmp_path / name, raw if raw is not None else xyz_frame() + bad))

    return build


XYZ_CASES = [
    Case("extxyz-missing-file", XYZ, lambda t: io.read(t / "absent.extxyz"), ("absent.extxyz", "no such file")),
    Case("extxyz-empty", XYZ, xyz("empty.extxyz", raw=""), ("empty.extxyz",)),
    Case("extxyz-binary-garbage", XYZ, xyz("garbage.extxyz", raw=b"\x00\xff\xfe binary \x80" * 20), ("garbage.extxyz",)),
    Case("extxyz-truncated-frame", XYZ, xyz("trunc.extxyz", xyz_frame(count=5)), ("trunc.extxyz",)),
    Case("extxyz-truncated-line", XYZ, xyz("cutline.extxyz", raw=(xyz_frame() * 2)[:-12]), ("cutline.extxyz",)),
    Case("extxyz-count-not-int", XYZ, xyz("count.extxyz", xyz_frame(count="three")), ("count.extxyz",)),
    Case("extxyz-nan-position", XYZ, xyz("nanpos.extxyz", xyz_frame(row(1, "H nan 0.0 0.0 0.0 0.0 0.0"))),
         ("nanpos.extxyz", "key 'positions'", "frame 1", "atom 1")),
    Case("extxyz-inf-force", XYZ, xyz("inff.extxyz", xyz_frame(row(2, "H -0.24 0.93 0.0 0.0 inf 0.0"))),
         ("inff.extxyz", "key 'forces'", "frame 1", "atom 2")),
    Case("extxyz-huge-energy", XYZ, xyz("huge.extxyz", xyz_frame(energy="1.0e400")),
         ("huge.extxyz", "key 'energy'", "frame 1")),
    Case("extxyz-huge-position", XYZ, xyz("hugepos.extxyz", xyz_frame(row(0, "O 1e999 0.0 0.0 0.1 0.0 0.0"))),
         ("hugepos.extxyz", "key 'positions'", "frame 1", "atom 0")),
    Case("extxyz-energy-not-a-number", XYZ, xyz("etype.extxyz", xyz_frame(energy="abc")), ("etype.extxyz", "energy")),
    Case("extxyz-no-energy-in-one-frame", XYZ, xyz("noe.extxyz", xyz_frame(energy=None)),
         ("noe.extxyz", "key 'energy'", "frame 1")),
    Case("extxyz-duplicate-atoms", XYZ, xyz("dup.extxyz", xyz_frame(row(2, "H 0.0 0.0 0.0 0.0 0.0 0.0"))),
         ("dup.extxyz", "frame 1", "atoms 0 ", "and 2 ")),
    Case("extxyz-unknown-symbol", XYZ, xyz("xx.extxyz", xyz_frame(row(1, "Xx 0.96 0.0 0.0 0.0 0.0 0.0"))),
         ("xx.extxyz", "Xx")),
    Case("extxyz-atomic-number-0", XYZ, xyz("z0.extxyz", xyz_frame(row(1, "X 0.96 0.0 0.0 0.0 0.0 0.0"))),
         ("z0.extxyz", "atomic number 0", "frame 1", "atom 1")),
    Case("extxyz-forces-wrong-shape", XYZ,
         xyz("fshape.extxyz", xyz_frame([r.rsplit(" ", 1)[0] for r in WATER], props="species:S:1:pos:R:3:forces:R:2")),
         ("fshape.extxyz", "key 'forces'", "frame 1", "(3, 2)")),
    Case("extxyz-singular-cell", XYZ,
         xyz("sing.extxyz", xyz_frame(lattice='Lattice="6.0 0.0 0.0 0.0 6.0 0.0 6.0 6.0 0.0" ', pbc="T T T")),
         ("sing.extxyz", "key 'cell'", "frame 1", "singular")),
    Case("extxyz-left-handed-cell", XYZ,
         xyz("left.extxyz", xyz_frame(lattice='Lattice="0.0 6.0 0.0 6.0 0.0 0.0 0.0 0.0 6.0" ', pbc="T T T")),
         ("left.extxyz", "key 'cell'", "frame 1", "left-handed")),
    Case("extxyz-pbc-without-cell", XYZ, xyz("nocell.extxyz", xyz_frame(pbc="T T T")),
         ("nocell.extxyz", "key 'cell'", "frame 1", "needs a cell")),
]


# ------------------------------------------------------------------------------------------------
# nequip npz (slices of real MD17 ethanol / LiPS through test_io's helpers)
# ------------------------------------------------------------------------------------------------
NPZ = "io.read_nequip_npz"


def put(key: str, index, value):
    """Mutation: a[key][index] = value."""

    def mutate(a):
        a[key][index] = value

    return mutate


def setkey(key: str, value_of: Callable[[dict], Any]):
    """Mutation: a[key] = value_of(a) (DROP deletes the key)."""

    def mutate(a):
        v = value_of(a)
        if v is DROP:
            del a[key]
        else:
            a[key] = v

    return mutate


def npz(name: str, mutate, periodic: bool = False):
    """Builder: a real slice, broken by `mutate`, written as `name` and read with `io.read_nequip_npz`."""

    def build(tmp_path):
        a = periodic_arrays(3) if periodic else ethanol_arrays(6)
        mutate(a)
        io.read_nequip_npz(write_npz(tmp_path, a, name))

    return build


def npz_bytes(name: str, content_of: Callable[[Path], bytes]):
    """Builder: the file `name` holds content_of(tmp_path) (given a good npz written beside it)."""

    def build(tmp_path):
        good = write_npz(tmp_path, ethanol_arrays(6), "good.npz")
        io.read_nequip_npz(write(tmp_path / name, content_of(good)))

    return build


def huge_energy(a):
    """An energy past float64's range (stored as long double): it reads as inf."""
    e = a["energy"].astype(np.longdouble)
    e[1, 0] = np.longdouble("1e4000")
    return e


def _dup(pos, frame, a, b):
    pos = pos.copy()
    pos[frame, b] = pos[frame, a]
    return pos


def _dir_npz(tmp_path):
    (tmp_path / "folder.npz").mkdir()
    io.read_nequip_npz(tmp_path / "folder.npz")


NPZ_CASES = [
    Case("npz-empty", NPZ, npz_bytes("empty.npz", lambda g: b""), ("empty.npz", "empty")),
    Case("npz-truncated", NPZ, npz_bytes("trunc.npz", lambda g: g.read_bytes()[: g.stat().st_size // 2]),
         ("trunc.npz", "truncated or corrupt")),
    Case("npz-not-a-zip", NPZ, npz_bytes("text.npz", lambda g: b"pos energy forces\n1 2 3\n"), ("text.npz", "not an .npz")),
    Case("npz-directory", NPZ, _dir_npz, ("folder.npz", "directory")),
    Case("npz-missing-energy", NPZ, npz("noenergy.npz", setkey("energy", lambda a: DROP)),
         ("noenergy.npz", "'energy'", "keys present")),
    Case("npz-positions-wrong-shape", NPZ, npz("shape.npz", setkey("pos", lambda a: a["pos"].reshape(6, 27))),
         ("shape.npz", "key 'pos'", "(6, 27)")),
    Case("npz-positions-strings", NPZ, npz("strpos.npz", setkey("pos", lambda a: a["pos"].astype(str))),
         ("strpos.npz", "key 'pos'", "numeric")),
    Case("npz-energy-object-array", NPZ,
         npz("objects.npz", setkey("energy", lambda a: np.array([{"e": 1.0}] * 6, dtype=object))),
         ("objects.npz", "key 'energy'")),
    Case("npz-nan-position", NPZ, npz("nanpos.npz", put("pos", (2, 4, 0), np.nan)),
         ("nanpos.npz", "key 'positions'", "frame 2", "atom 4")),
    Case("npz-inf-force", NPZ, npz("inff.npz", put("forces", (5, 8, 1), np.inf)),
         ("inff.npz", "key 'forces'", "frame 5", "atom 8")),
    Case("npz-nan-energy", NPZ, npz("nane.npz", put("energy", (3, 0), np.nan)), ("nane.npz", "key 'energy'", "frame 3")),
    Case("npz-huge-energy", NPZ, npz("hugee.npz", setkey("energy", huge_energy)), ("hugee.npz", "key 'energy'", "frame 1")),
    Case("npz-duplicate-atoms", NPZ, npz("dup.npz", setkey("pos", lambda a: _dup(a["pos"], 3, 1, 7))),
         ("dup.npz", "frame 3", "atoms 1 ", "and 7 ")),
    Case("npz-atomic-number-0", NPZ, npz("z0.npz", put("atomic_numbers", 4, 0)),
         ("z0.npz", "atomic number 0", "frame 0", "atom 4")),
    Case("npz-atomic-number-200", NPZ, npz("z200.npz", put("atomic_numbers", 2, 200)),
         ("z200.npz", "atomic number 200", "atom 2")),
    Case("npz-numbers-wrong-length", NPZ, npz("nnum.npz", setkey("atomic_numbers", lambda a: a["atomic_numbers"][:8])),
         ("nnum.npz", "key 'atomic_numbers'", "(8,)")),
    Case("npz-forces-wrong-shape", NPZ, npz("fshape.npz", setkey("forces", lambda a: a["forces"][:, :, :2])),
         ("fshape.npz", "key 'forces'", "(6, 9, 2)")),
    Case("npz-cell-wrong-shape", NPZ, npz("cshape.npz", setkey("cell", lambda a: np.eye(2)), periodic=True),
         ("cshape.npz", "key 'cell'", "(2, 2)")),
    Case("npz-pbc-wrong-shape", NPZ, npz("pshape.npz", setkey("pbc", lambda a: np.array([True, True])), periodic=True),
         ("pshape.npz", "key 'pbc'", "(2,)")),
    Case("npz-singular-cell", NPZ, npz("sing.npz", setkey("cell", lambda a: a["cell"][[0, 0, 2]]), periodic=True),
         ("sing.npz", "key 'cell'", "frame 0", "singular")),
    Case("npz-left-handed-cell", NPZ, npz("left.npz", setkey("cell", lambda a: a["cell"][[1, 0, 2]]), periodic=True),
         ("left.npz", "key 'cell'", "frame 0", "left-handed")),
    Case("npz-stress-wrong-shape", NPZ, npz("sshape.npz", setkey("stress", lambda a: np.zeros((3, 5))), periodic=True),
         ("sshape.npz", "key 'stress'", "(3, 5)")),
]


# ------------------------------------------------------------------------------------------------
# DeePMD-kit systems (real Li2S frames through test_io's `deepmd_copy`)
# ------------------------------------------------------------------------------------------------
DPMD = "io.read_deepmd"


def deepmd(damage: Callable[[Path], None]):
    """Builder: a 2-frame DeePMD-kit system (`sys/`), broken by damage(system dir), read with `io.read_deepmd`."""

    def build(tmp_path):
        d = deepmd_copy(tmp_path, sets=(2,), name="sys")
        damage(d)
        io.read_deepmd(d)

    return build


def npy(rel: str, change: Callable[[np.ndarray], Any]):
    """Damage: replace the array `rel` of the system by change(array)."""

    def damage(d):
        np.save(d / rel, change(np.load(d / rel)))

    return damage


def text(rel: str, content):
    """Damage: overwrite the file `rel` of the system with `content`."""
    return lambda d: write(d / rel, content)


def at(index, value):
    """Array change: a copy with a[index] = value."""

    def change(a):
        a = a.astype(np.result_type(a, np.asarray(value))).copy()
        a[index] = value
        return a

    return change


def _singular_box(box):
    box = box.copy().reshape(-1, 3, 3)
    box[1, 2] = box[1, 0] + box[1, 1]
    return box.reshape(-1, 9)


def _dup_flat(coord, frame, a, b):
    coord = coord.copy()
    coord[frame, 3 * b : 3 * b + 3] = coord[frame, 3 * a : 3 * a + 3]
    return coord


def _no_sets(d):
    for s in d.glob("set.*"):
        for f in s.iterdir():
            f.unlink()
        s.rmdir()


DPMD_CASES = [
    Case("deepmd-not-a-directory", DPMD, lambda t: io.read_deepmd(write(t / "system.raw", "0 0 1\n")),
         ("system.raw", "not a directory")),
    Case("deepmd-empty-type-raw", DPMD, deepmd(text("type.raw", "")), ("sys/type.raw", "empty")),
    Case("deepmd-type-raw-not-int", DPMD, deepmd(text("type.raw", "Li Li S\n")), ("sys/type.raw", "integer")),
    Case("deepmd-type-index-negative", DPMD, deepmd(text("type.raw", "0\n" * 3 + "-1\n" + "0\n" * 92)),
         ("sys/type.raw", "atom 3", "-1")),
    Case("deepmd-unknown-symbol", DPMD, deepmd(text("type_map.raw", "Xx P S\n")), ("sys/type_map.raw", "'Xx'")),
    Case("deepmd-no-sets", DPMD, deepmd(_no_sets), ("sys", "no set.*")),
    Case("deepmd-coord-empty-file", DPMD, deepmd(text("set.000/coord.npy", b"")), ("set.000/coord.npy", "key 'coord'")),
    Case("deepmd-coord-truncated", DPMD,
         deepmd(lambda d: write(d / "set.000/coord.npy", (d / "set.000/coord.npy").read_bytes()[:1000])),
         ("set.000/coord.npy", "key 'coord'", "truncated or corrupt")),
    Case("deepmd-coord-1d", DPMD, deepmd(npy("set.000/coord.npy", lambda a: a[0])), ("set.000/coord.npy", "key 'coord'")),
    Case("deepmd-nan-coord", DPMD, deepmd(npy("set.000/coord.npy", at((1, 3 * 5 + 2), np.nan))),
         ("set.000", "key 'positions'", "frame 1", "atom 5")),
    Case("deepmd-duplicate-atoms", DPMD, deepmd(npy("set.000/coord.npy", lambda a: _dup_flat(a, 0, 0, 9))),
         ("set.000", "frame 0", "atoms 0 ", "and 9 ")),
    Case("deepmd-box-wrong-shape", DPMD, deepmd(npy("set.000/box.npy", lambda a: a[:, :6])),
         ("set.000/box.npy", "key 'box'", "6 values per frame")),
    Case("deepmd-singular-box", DPMD, deepmd(npy("set.000/box.npy", _singular_box)), ("set.000/box.npy", "key 'box'", "frame 1", "singular")),
    Case("deepmd-energy-strings", DPMD, deepmd(npy("set.000/energy.npy", lambda a: a.astype(str))),
         ("set.000/energy.npy", "key 'energy'", "numeric")),
    Case("deepmd-huge-energy", DPMD, deepmd(npy("set.000/energy.npy", at(1, np.longdouble("1e4000")))),
         ("set.000", "key 'energy'", "frame 1")),
    Case("deepmd-energy-frame-count", DPMD, deepmd(npy("set.000/energy.npy", lambda a: a[:1])),
         ("set.000/energy.npy", "key 'energy'", "1 frames")),
    Case("deepmd-nan-virial", DPMD, deepmd(npy("set.000/virial.npy", at((0, 4), np.nan))),
         ("set.000", "key 'stress'", "frame 0")),
]


# ------------------------------------------------------------------------------------------------
# Dataset cards (`jaxbench.data`, from a user card folder in $JAXBENCH_CARDS)
# ------------------------------------------------------------------------------------------------
DATA = "data cards"
DATA_CARD = {
    "name": "bad-data",
    "kind": "molecule",
    "simulation": {"temperature_K": [300], "timestep_fs": [0.5]},
    "sources": {"all": {"format": "nequip-npz", "path": "x/data.npz", "frames": 10, "atoms": 9, "elements": ["C", "H", "O"],
                        "files": [{"path": "x/data.npz", "sha256": "0" * 64}]}},
    "splits": {"train": [{"source": "all", "frames": "0:5"}]},
}


@contextlib.contextmanager
def user_cards(root: Path):
    """$JAXBENCH_CARDS = root for the block, card caches cleared on the way in and out."""
    old = os.environ.get(cards.ENV_CARDS)
    os.environ[cards.ENV_CARDS] = str(root)
    data.clear_caches()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(cards.ENV_CARDS, None)
        else:
            os.environ[cards.ENV_CARDS] = old
        data.clear_caches()


def card_files(kind: str, files: dict[str, Any], call: Callable[[], Any]):
    """Builder: `files` ({name: content}) in a user card folder's `kind/`, then call() with it active."""

    def build(tmp_path):
        root = tmp_path / "cards"
        for name, content in files.items():
            write(root / kind / name, content)
        with user_cards(root):
            call()

    return build


def dataset_card(name: str, content):
    """Builder: the dataset card `name` (a dict, or text / bytes as they are), looked up with `data.get`."""
    return card_files("data", {name: content}, lambda: data.get("bad-data"))


def data_edit(name: str, changes: dict):
    return dataset_card(name, edit(DATA_CARD, changes))


DATA_CASES = [
    Case("data-card-not-yaml", DATA, dataset_card("unclosed.yaml", "name: bad-data\nsources: [unclosed\n"),
         ("unclosed.yaml", "not valid YAML")),
    Case("data-card-not-utf8", DATA, dataset_card("latin1.yaml", "name: caf\xe9\n".encode("latin-1")), ("latin1.yaml",)),
    Case("data-card-empty", DATA, dataset_card("empty.yaml", ""), ("empty.yaml", "mapping")),
    Case("data-card-a-list", DATA, dataset_card("list.yaml", [DATA_CARD]), ("list.yaml", "mapping")),
    Case("data-card-no-name", DATA, data_edit("noname.yaml", {"name": DROP}), ("noname.yaml", "'name'")),
    Case("data-card-no-sources", DATA, data_edit("nosrc.yaml", {"sources": DROP}), ("nosrc.yaml", "key 'sources'")),
    Case("data-card-sources-a-list", DATA, data_edit("srclist.yaml", {"sources": ["all"]}), ("srclist.yaml", "key 'sources'")),
    Case("data-card-source-a-string", DATA, data_edit("srcstr.yaml", {"sources.all": "x/data.npz"}),
         ("srcstr.yaml", "key 'sources.all'")),
    Case("data-card-source-no-format", DATA, data_edit("nofmt.yaml", {"sources.all.format": DROP}),
         ("nofmt.yaml", "key 'sources.all.format'")),
    Case("data-card-frames-not-int", DATA, data_edit("frames.yaml", {"sources.all.frames": "many"}),
         ("frames.yaml", "key 'sources.all.frames'", "many")),
    Case("data-card-frames-zero", DATA, data_edit("frames0.yaml", {"sources.all.frames": 0}),
         ("frames0.yaml", "key 'sources.all.frames'")),
    Case("data-card-atoms-negative", DATA, data_edit("atoms.yaml", {"sources.all.atoms": -9}),
         ("atoms.yaml", "key 'sources.all.atoms'", "-9")),
    Case("data-card-unknown-element", DATA, data_edit("elem.yaml", {"sources.all.elements": ["C", "Xx"]}),
         ("elem.yaml", "key 'sources.all.elements'", "Xx")),
    Case("data-card-file-no-sha256", DATA, data_edit("nosha.yaml", {"sources.all.files": [{"path": "x/data.npz"}]}),
         ("nosha.yaml", "key 'sources.all.files'", "sha256")),
    Case("data-card-split-unknown-source", DATA, data_edit("splitsrc.yaml", {"splits.train": [{"source": "nope"}]}),
         ("splitsrc.yaml", "key 'splits.train'", "'nope'")),
    Case("data-card-split-bad-range", DATA, data_edit("range.yaml", {"splits.train": [{"source": "all", "frames": "0:x"}]}),
         ("range.yaml", "key 'splits.train'", "0:x")),
    Case("data-card-split-entry-a-string", DATA, data_edit("splitstr.yaml", {"splits.train": ["all"]}),
         ("splitstr.yaml", "key 'splits.train'")),
    Case("data-card-negative-temperature", DATA, data_edit("temp.yaml", {"simulation.temperature_K": [-5]}),
         ("temp.yaml", "key 'simulation.temperature_K'", "-5")),
    Case("data-card-nan-temperature", DATA, data_edit("tnan.yaml", {"simulation.temperature_K": float("nan")}),
         ("tnan.yaml", "key 'simulation.temperature_K'")),
    Case("data-card-zero-timestep", DATA, data_edit("dt0.yaml", {"simulation.timestep_fs": [0.0]}),
         ("dt0.yaml", "key 'simulation.timestep_fs'")),
    Case("data-card-timestep-not-a-number", DATA, data_edit("dtstr.yaml", {"simulation.timestep_fs": "fast"}),
         ("dtstr.yaml", "key 'simulation.timestep_fs'", "fast")),
    Case("data-card-duplicate-name", DATA,
         card_files("data", {"a.yaml": DATA_CARD, "b.yaml": DATA_CARD}, lambda: data.get("bad-data")),
         ("b.yaml", "a.yaml", "bad-data")),
]


# ------------------------------------------------------------------------------------------------
# Model cards (`jaxbench.potential.model_card` + the training block's `TrainingConfig.from_card`)
# ------------------------------------------------------------------------------------------------
MODEL = "model cards"
MODEL_CARD = {
    "name": "bad-model",
    "architecture": "schnet",
    "hyperparameters": {"r_max": 5.0, "n_atom_basis": 8, "n_filters": 6, "n_interactions": 2, "n_rbf": 5},
    "training": {"learning_rate": 0.001, "batch_size": 2, "max_epochs": 1},
    "variants": {"small": {"hyperparameters": {"n_rbf": 4}}},
}


def _read_model_card():
    TrainingConfig.from_card(potential.model_card("bad-model"))


def model_edit(name: str, changes: dict | None = None, raw=None):
    """Builder: the model card `name` (MODEL_CARD edited, or `raw`), read by name and its training block parsed."""
    return card_files("models", {name: raw if raw is not None else edit(MODEL_CARD, changes or {})}, _read_model_card)


def model_file(name: str, content):
    """Builder: a model card file given by path to `jaxbench.train.setup.read_model`."""
    return lambda tmp_path: read_model(write(tmp_path / name, content))


MODEL_CASES = [
    Case("model-card-not-yaml", MODEL, model_edit("unclosed.yaml", raw="name: bad-model\nhyperparameters: {r_max: 5\n"),
         ("unclosed.yaml", "not valid YAML")),
    Case("model-card-not-utf8", MODEL, model_edit("latin1.yaml", raw="name: bad-model\ntitle: \xe9\n".encode("latin-1")),
         ("latin1.yaml",)),
    Case("model-card-no-architecture", MODEL, model_edit("noarch.yaml", {"architecture": DROP}),
         ("noarch.yaml", "key 'architecture'")),
    Case("model-card-unknown-architecture", MODEL, model_edit("arch.yaml", {"architecture": "schnett"}),
         ("arch.yaml", "key 'architecture'", "schnett")),
    Case("model-card-hyperparameters-a-list", MODEL, model_edit("hplist.yaml", {"hyperparameters": [5.0]}),
         ("hplist.yaml", "key 'hyperparameters'")),
    Case("model-card-negative-r-max", MODEL, model_edit("rneg.yaml", {"hyperparameters.r_max": -5.0}),
         ("rneg.yaml", "key 'hyperparameters.r_max'", "-5")),
    Case("model-card-r-max-not-a-number", MODEL, model_edit("rstr.yaml", {"hyperparameters.r_max": "five"}),
         ("rstr.yaml", "key 'hyperparameters.r_max'", "five")),
    Case("model-card-variants-a-list", MODEL, model_edit("varlist.yaml", {"variants": ["small"]}),
         ("varlist.yaml", "key 'variants'")),
    Case("model-card-variant-not-a-mapping", MODEL, model_edit("var3.yaml", {"variants.small": 3}),
         ("var3.yaml", "key 'variants.small'")),
    Case("model-card-variant-zero-r-max", MODEL, model_edit("var0.yaml", {"variants.small.hyperparameters.r_max": 0}),
         ("var0.yaml", "key 'variants.small.hyperparameters.r_max'")),
    Case("model-card-negative-learning-rate", MODEL, model_edit("lr.yaml", {"training.learning_rate": -1e-3}),
         ("lr.yaml", "training.learning_rate")),
    Case("model-card-batch-size-not-int", MODEL, model_edit("bs.yaml", {"training.batch_size": "big"}),
         ("bs.yaml", "training.batch_size", "big")),
    Case("model-card-file-no-hyperparameters", MODEL, model_file("nohp.yaml", edit(MODEL_CARD, {"hyperparameters": DROP})),
         ("nohp.yaml", "hyperparameters")),
    Case("model-card-json-truncated", MODEL, model_file("card.json", json.dumps(MODEL_CARD)[:40]),
         ("card.json", "not valid JSON")),
]


# ------------------------------------------------------------------------------------------------
# Protocol cards (`md.load_protocol` of a file, `md.Protocol.from_dict(...).validate()`)
# ------------------------------------------------------------------------------------------------
PROTO = "protocol cards"
PROTO_CARD = {"ensemble": "nvt_langevin", "temperature_K": 300.0, "timestep_fs": 1.0, "steps": 100, "replicas": 2,
              "save_every": 10, "chunk_steps": 50}


def protocol_file(name: str, content=None, changes: dict | None = None, dataset: str | None = None):
    """Builder: a protocol card file (`content`, or PROTO_CARD edited), read with `md.load_protocol`."""

    def build(tmp_path):
        body = content if content is not None else edit(PROTO_CARD, changes or {})
        md.load_protocol(write(tmp_path / name, body), dataset=dataset)

    return build


def protocol_dict(changes: dict):
    return lambda tmp_path: md.Protocol.from_dict(edit(PROTO_CARD, changes)).validate()


PROTO_CASES = [
    Case("protocol-not-yaml", PROTO, protocol_file("unclosed.yaml", "steps: [1, 2\n"), ("unclosed.yaml", "not valid YAML")),
    Case("protocol-not-utf8", PROTO, protocol_file("latin1.yaml", "name: caf\xe9\n".encode("latin-1")), ("latin1.yaml",)),
    Case("protocol-empty", PROTO, protocol_file("empty.yaml", ""), ("empty.yaml", "empty")),
    Case("protocol-a-list", PROTO, protocol_file("list.yaml", [PROTO_CARD]), ("list.yaml", "mapping")),
    Case("protocol-unknown-key", PROTO, protocol_file("typo.yaml", changes={"tempertaure_K": 300}),
         ("typo.yaml", "tempertaure_K")),
    Case("protocol-negative-temperature", PROTO, protocol_file("tneg.yaml", changes={"temperature_K": -5.0}),
         ("tneg.yaml", "key 'temperature_K'", "-5")),
    Case("protocol-zero-temperature", PROTO, protocol_file("t0.yaml", changes={"temperature_K": 0}),
         ("t0.yaml", "key 'temperature_K'")),
    Case("protocol-huge-temperature", PROTO, protocol_file("tinf.yaml", "temperature_K: 1.0e+400\n"),
         ("tinf.yaml", "key 'temperature_K'", "inf")),
    Case("protocol-zero-timestep", PROTO, protocol_file("dt0.yaml", changes={"timestep_fs": 0.0}),
         ("dt0.yaml", "key 'timestep_fs'")),
    Case("protocol-huge-timestep", PROTO, protocol_file("dt50.yaml", changes={"timestep_fs": 50.0}),
         ("dt50.yaml", "key 'timestep_fs'", "50")),
    Case("protocol-timestep-not-a-number", PROTO, protocol_file("dtstr.yaml", changes={"timestep_fs": "fast"}),
         ("dtstr.yaml", "key 'timestep_fs'", "fast")),
    Case("protocol-steps-not-a-number", PROTO, protocol_file("steps.yaml", changes={"steps": "many"}),
         ("steps.yaml", "key 'steps'", "many")),
    Case("protocol-metadynamics-a-list", PROTO, protocol_file("metalist.yaml", changes={"metadynamics": [1, 2]}),
         ("metalist.yaml", "metadynamics")),
    Case("protocol-metadynamics-triple", PROTO,
         protocol_file("meta3.yaml", changes={"metadynamics": {"dihedrals": [[0, 1, 2]], "pace_fs": 10.0}}),
         ("meta3.yaml", "metadynamics.dihedrals")),
    Case("protocol-metadynamics-height-not-a-number", PROTO,
         protocol_file("metah.yaml", changes={"metadynamics": {"dihedrals": [[0, 1, 2, 3]], "height_kJ_mol": "big"}}),
         ("metah.yaml", "metadynamics.height_kJ_mol", "big")),
    Case("protocol-dataset-override-negative-timestep", PROTO,
         protocol_file("perds.yaml", changes={"datasets": {"lips": {"timestep_fs": -1.0}}}, dataset="lips"),
         ("perds.yaml", "key 'timestep_fs'", "-1")),
    Case("protocol-dataset-not-listed", PROTO,
         protocol_file("nods.yaml", changes={"datasets": {"lips": {}}}, dataset="gete"), ("nods.yaml", "'gete'")),
    Case("protocol-dict-unknown-ensemble", PROTO, protocol_dict({"ensemble": "npt"}), ("key 'ensemble'", "'npt'")),
    Case("protocol-dict-zero-replicas", PROTO, protocol_dict({"replicas": 0}), ("key 'replicas'",)),
    Case("protocol-dict-negative-friction", PROTO, protocol_dict({"friction_per_fs": -0.1}), ("key 'friction_per_fs'",)),
    Case("protocol-dict-temperature-none", PROTO, protocol_dict({"temperature_K": None}), ("key 'temperature_K'", "None")),
    Case("protocol-dict-scoring-a-string", PROTO, protocol_dict({"scoring": "strict"}), ("key 'scoring'", "strict")),
]


# ------------------------------------------------------------------------------------------------
# H5MD trajectories (`trajectory.read` / `read_info`)
# ------------------------------------------------------------------------------------------------
TRAJ = "trajectory.read"


def write_trajectory(path: Path) -> Path:
    """A small complete trajectory: 2 replicas of 4 argon atoms, 3 frames."""
    st = _small_start(2)
    w = trajectory.TrajectoryWriter(path, st.numbers, [39.95] * 4, st.cell, st.pbc, 2, 1.0, metadata={"seed": 0})
    rng = np.random.default_rng(0)
    w.append([0, 10, 20], {k: rng.normal(size=(2, 3, 4, 3)) for k in trajectory.PARTICLE_FIELDS},
             {k: rng.normal(size=(2, 3)) for k in trajectory.OBSERVABLES})
    w.close()
    return path


def traj(name: str, damage: Callable[[Path], Any], reader=trajectory.read, **kw):
    """Builder: a good trajectory `name`, damage(path), then reader(path)."""

    def build(tmp_path):
        p = write_trajectory(tmp_path / name)
        damage(p)
        reader(p, **kw)

    return build


def h5(change: Callable[[h5py.File], Any]):
    """Damage: change(file) on the file opened for writing."""

    def damage(p):
        with h5py.File(p, "r+") as f:
            change(f)

    return damage


def _delete(key):
    return h5(lambda f: f.__delitem__(key))


def _set_attr(key, value):
    return h5(lambda f: f["parameters/jaxbench"].attrs.__setitem__(key, value))


def _empty_particles(f):
    for g in list(f["particles"]):
        del f[f"particles/{g}"]


def _flat_positions(f):
    del f["particles/replica_000/position/value"]
    f.create_dataset("particles/replica_000/position/value", data=np.zeros((3, 4, 2)))


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


TRAJ_CASES = [
    Case("traj-missing-file", TRAJ, lambda t: trajectory.read(t / "absent.h5"), ("absent.h5", "no such")),
    Case("traj-empty-file", TRAJ, lambda t: trajectory.read(write(t / "empty.h5", b"")), ("empty.h5", "empty")),
    Case("traj-not-hdf5", TRAJ, lambda t: trajectory.read(write(t / "text.h5", "step position\n0 1.0\n")),
         ("text.h5", "not an HDF5")),
    Case("traj-directory", TRAJ, lambda t: trajectory.read_info(mkdir(t / "folder.h5")), ("folder.h5", "directory")),
    Case("traj-truncated", TRAJ, traj("trunc.h5", _truncate), ("trunc.h5", "truncated or corrupt")),
    Case("traj-no-parameters", TRAJ, traj("noparam.h5", _delete("parameters")), ("noparam.h5", "key 'parameters/jaxbench'")),
    Case("traj-no-particles", TRAJ, traj("nopart.h5", _delete("particles")), ("nopart.h5", "key 'particles'")),
    Case("traj-no-replicas", TRAJ, traj("norep.h5", h5(_empty_particles), reader=trajectory.read_info),
         ("norep.h5", "key 'particles'", "no replica")),
    Case("traj-no-species", TRAJ, traj("nospec.h5", _delete("particles/replica_000/species"), reader=trajectory.read_info),
         ("nospec.h5", "key 'particles/replica_000/species'")),
    Case("traj-no-position", TRAJ, traj("nopos.h5", _delete("particles/replica_001/position")),
         ("nopos.h5", "key 'particles/replica_001/position/value'")),
    Case("traj-no-observables", TRAJ, traj("noobs.h5", _delete("observables/replica_000")),
         ("noobs.h5", "key 'observables/replica_000'")),
    Case("traj-no-box-boundary", TRAJ, traj("nobound.h5", h5(lambda f: f["particles/replica_000/box"].attrs.__delitem__("boundary"))),
         ("nobound.h5", "key 'particles/replica_000/box'", "boundary")),
    Case("traj-position-wrong-shape", TRAJ, traj("pshape.h5", h5(_flat_positions)),
         ("pshape.h5", "key 'particles/replica_000/position/value'", "(3, 4, 2)")),
    Case("traj-committed-past-end", TRAJ, traj("past.h5", _set_attr("frames_committed", 100)),
         ("past.h5", "frames_committed", "100")),
    Case("traj-committed-not-int", TRAJ, traj("cstr.h5", _set_attr("frames_committed", "abc")),
         ("cstr.h5", "frames_committed", "abc")),
    Case("traj-replica-out-of-range", TRAJ, traj("range.h5", lambda p: None, replicas=[5]), ("range.h5", "replica 5")),
]


# ------------------------------------------------------------------------------------------------
# MD starts (`md.Start.make`, `check_start`): no file applies, the key / replica / atom do
# ------------------------------------------------------------------------------------------------
START = "md.Start.make / check_start"
LJ = md.lennard_jones(cutoff=5.0)


def make(**over):
    """Builder: `md.Start.make` of a 4-atom argon cell with arguments replaced."""

    def build(tmp_path):
        st = argon(1)
        kw = dict(positions=st.positions[0], numbers=st.numbers, cell=st.cell, pbc=True, replicas=2)
        kw.update(over)
        md.Start.make(**kw)

    return build


def checked(change: Callable[[md.Start], md.Start], model=LJ):
    """Builder: `check_start` of a 2-replica argon start changed by change(start)."""

    def build(tmp_path):
        st = argon(1, replicas=2)
        check_start(change(dataclasses.replace(st, positions=st.positions.copy())), model)

    return build


def with_(field: str, fn):
    return lambda st: dataclasses.replace(st, **{field: fn(getattr(st, field))})


def _nan_atom(pos):
    pos[1, 2, 0] = np.nan
    return pos


def _inf_velocity(st):
    v = np.zeros(st.positions.shape)
    v[0, 3, 1] = np.inf
    return dataclasses.replace(st, velocities=v)


def _overlap(pos):
    pos[0, 3] = pos[0, 0] + [0.01, 0.0, 0.0]
    return pos


START_CASES = [
    Case("start-positions-wrong-shape", START, make(positions=np.zeros((4, 2))), ("positions", "(2, 4, 2)")),
    Case("start-positions-strings", START, make(positions=[["a", "b", "c"]] * 4), ("key 'positions'",)),
    Case("start-numbers-wrong-length", START, make(numbers=[18] * 3), ("3 atomic numbers for 4 atoms",)),
    Case("start-numbers-symbols", START, make(numbers=["Ar"] * 4), ("key 'numbers'", "Ar")),
    Case("start-cell-wrong-shape", START, make(cell=np.eye(2)), ("key 'cell'", "(2, 2)")),
    Case("start-pbc-wrong-shape", START, make(pbc=[True, False]), ("key 'pbc'",)),
    Case("start-velocities-wrong-shape", START, make(velocities=np.zeros((4, 2))), ("key 'velocities'", "(4, 2)")),
    Case("start-nan-position", START, checked(with_("positions", _nan_atom)), ("key 'positions'", "replica 1", "atom 2")),
    Case("start-inf-velocity", START, checked(_inf_velocity), ("key 'velocities'", "replica 0", "atom 3")),
    Case("start-duplicate-atoms", START, checked(with_("positions", _overlap)), ("overlapping", "replica 0", "atoms 0, 3")),
    Case("start-singular-cell", START, checked(with_("cell", lambda c: c * np.array([[1.0], [1.0], [0.0]]))),
         ("key 'cell'", "zero")),
    Case("start-flat-cell", START, checked(with_("cell", lambda c: np.array([c[0], c[1], c[0] + c[1]]))),
         ("key 'cell'", "singular")),
    Case("start-left-handed-cell", START, checked(with_("cell", lambda c: c[[1, 0, 2]])), ("key 'cell'", "left-handed")),
    Case("start-atomic-number-0", START, checked(with_("numbers", lambda z: np.array([18, 0, 18, 18], np.int32))),
         ("key 'numbers'", "atomic number 0", "atom 1")),
    Case("start-atomic-number-200", START, checked(with_("numbers", lambda z: np.array([18, 18, 200, 18], np.int32))),
         ("key 'numbers'", "atomic number 200", "atom 2")),
    Case("start-species-the-model-lacks", START,
         checked(lambda st: st, md.EnergyModel(fn=LJ.fn, cutoff=5.0, params=LJ.params, species=(1, 8), name="h2o-only")),
         ("cannot represent Ar",)),
]


# ------------------------------------------------------------------------------------------------
# Run directories (`runs.read_run`, `runs.read_json`)
# ------------------------------------------------------------------------------------------------
RUNS = "runs.read_run"


def run_dir(tmp_path: Path) -> Path:
    """A run directory as training writes it (card, statistics, dataset; no checkpoint needed here)."""
    from jaxbench.stats import DatasetStatistics

    run = tmp_path / "run"
    run.mkdir()
    stats = DatasetStatistics(species=(1, 6, 8), atomic_energies={1: 0.0, 6: 0.0, 8: 0.0}, energy_per_atom_mean=0.0,
                              energy_per_atom_std=1.0, force_rms=1.0, avg_num_neighbors=8.0, cutoff=5.0, n_frames=1)
    runs.write_json(run / "card.json", potential.model_card("nequip-small"))
    (run / "statistics.json").write_text(stats.dumps())
    runs.write_json(run / "dataset.json", {"name": "md17-ethanol"})
    return run


def run_case(damage: Callable[[Path], Any]):
    """Builder: a good run directory, damage(run dir), then `runs.read_run`."""

    def build(tmp_path):
        run = run_dir(tmp_path)
        damage(run)
        runs.read_run(run)

    return build


def stats_edit(changes: dict):
    """Damage: statistics.json with `changes` applied."""

    def damage(run):
        s = json.loads((run / "statistics.json").read_text())
        (run / "statistics.json").write_text(json.dumps(edit(s, changes)))

    return damage


def _as_directory(name):
    def damage(run):
        (run / name).unlink()
        (run / name).mkdir()

    return damage


RUNS_CASES = [
    Case("run-missing-directory", RUNS, lambda t: runs.read_run(t / "norun"), ("norun", "does not exist")),
    Case("run-card-missing", RUNS, run_case(lambda r: (r / "card.json").unlink()), ("card.json", "missing")),
    Case("run-card-truncated", RUNS, run_case(lambda r: write(r / "card.json", (r / "card.json").read_text()[:30])),
         ("card.json", "not valid JSON")),
    Case("run-card-empty", RUNS, run_case(lambda r: write(r / "card.json", "")), ("card.json", "not valid JSON")),
    Case("run-card-a-list", RUNS, run_case(lambda r: write(r / "card.json", "[1, 2]")), ("card.json", "JSON object")),
    Case("run-card-no-architecture", RUNS, run_case(lambda r: write(r / "card.json", '{"name": "x", "hyperparameters": {}}')),
         ("card.json", "key 'architecture'")),
    Case("run-statistics-missing-key", RUNS, run_case(stats_edit({"atomic_energies": DROP})),
         ("statistics.json", "key 'atomic_energies'")),
    Case("run-statistics-a-list", RUNS, run_case(lambda r: write(r / "statistics.json", "[]")),
         ("statistics.json", "JSON object")),
    Case("run-statistics-species-symbols", RUNS, run_case(stats_edit({"species": ["H", "C", "O"]})),
         ("statistics.json", "key 'species'", "'H'")),
    Case("run-statistics-species-200", RUNS, run_case(stats_edit({"species": [1, 6, 200]})),
         ("statistics.json", "key 'species'", "200")),
    Case("run-statistics-negative-cutoff", RUNS, run_case(stats_edit({"cutoff": -5.0})),
         ("statistics.json", "key 'cutoff'", "-5")),
    Case("run-statistics-nan-force-rms", RUNS, run_case(stats_edit({"force_rms": float("nan")})),
         ("statistics.json", "key 'force_rms'", "nan")),
    Case("run-statistics-unknown-key", RUNS, run_case(stats_edit({"cutof": 5.0})), ("statistics.json", "cutof")),
    Case("run-dataset-a-directory", RUNS, run_case(_as_directory("dataset.json")), ("dataset.json", "cannot read")),
    Case("run-dataset-binary", RUNS, run_case(lambda r: write(r / "dataset.json", b"\xff\xfe\x00garbage")),
         ("dataset.json", "not valid JSON")),
    Case("run-dataset-no-name", RUNS, run_case(lambda r: write(r / "dataset.json", '{"splits": {}}')),
         ("dataset.json", "key 'name'")),
    Case("run-config-a-list", RUNS, run_case(lambda r: write(r / "config.json", "[]")), ("config.json", "JSON object")),
    Case("read-json-a-directory", RUNS, lambda t: runs.read_json(mkdir(t / "folder.json")), ("folder.json", "cannot read")),
]


CASES: list[Case] = XYZ_CASES + NPZ_CASES + DPMD_CASES + DATA_CASES + MODEL_CASES + PROTO_CASES + TRAJ_CASES + START_CASES + RUNS_CASES


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_jaxbench_error_naming_the_fault(case, tmp_path):
    with pytest.raises(JaxbenchError) as e:
        case.build(tmp_path)
    msg = str(e.value)
    missing = [s for s in case.expect if s not in msg]
    assert not missing, f"{case.id}: message lacks {missing}: {type(e.value).__name__}: {msg}"
    # the message stands on its own: no raw traceback of a lower layer chained to it
    assert e.value.__cause__ is None or isinstance(e.value.__cause__, JaxbenchError), case.id


def test_table_covers_every_reader(record_property):
    counts = collections.Counter(c.reader for c in CASES)
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 60
    assert set(counts) == {XYZ, NPZ, DPMD, DATA, MODEL, PROTO, TRAJ, START, RUNS}
    assert min(counts.values()) >= 5, counts
    for reader, n in sorted(counts.items()):
        record_property(reader, n)
        print(f"{reader}: {n} cases")
    print(f"total: {len(CASES)} cases")


def test_the_unbroken_inputs_read(tmp_path):
    """The inputs every case breaks are themselves good: each failure is the case's fault, not the base's."""
    io.read(write(tmp_path / "good.extxyz", xyz_frame() * 2 + xyz_frame(lattice=BOX, pbc="T T T")))
    io.read_nequip_npz(write_npz(tmp_path, ethanol_arrays(6)))
    io.read_nequip_npz(write_npz(tmp_path, periodic_arrays(3), "periodic.npz"))
    assert len(io.read_deepmd(deepmd_copy(tmp_path, sets=(2,), name="sys"))) == 2
    card_files("data", {"good.yaml": DATA_CARD}, lambda: data.get("bad-data"))(tmp_path / "d")
    card_files("models", {"good.yaml": MODEL_CARD}, _read_model_card)(tmp_path / "m")
    md.load_protocol(write(tmp_path / "good.yaml", PROTO_CARD))
    md.load_protocol(write(tmp_path / "perds.yaml", edit(PROTO_CARD, {"datasets": {"lips": {"timestep_fs": 0.5}}})), "lips")
    tr = trajectory.read(write_trajectory(tmp_path / "good.h5"))
    assert tr["position"].shape == (2, 3, 4, 3)
    check_start(argon(1, replicas=2), LJ)
    runs.read_run(run_dir(tmp_path))
