"""Dataset cards, fetch / verify, and `jaxbench.data.load` on the real reference data."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxbench import data
from jaxbench.errors import ChecksumError, DataError, UnknownNameError

from .conftest import MIRROR, REPO, requires_data

FAMILIES = ["md17-aspirin", "md17-ethanol", "md17-naphthalene", "md17-salicylic_acid", "3bpa", "acac", "lips", "gete", "lips20"]
UPSTREAM = "https://github.com/M3RG-IITD/MDBENCHGNN/raw/e4ee1e9022186e27568df690913cfab2b12295b0/"


def test_cards_name_every_family_and_table10():
    specs = data.datasets()
    for name in FAMILIES:
        assert name in specs
    expected = {  # EGraFFBench Table 10 (temperature K, timestep fs)
        "md17-ethanol": ([500], [0.5]),
        "3bpa": ([300, 600], [1.0]),
        "acac": ([300, 600], [1.0, 0.5]),
        "lips": ([520], [1.0]),
        "lips20": ([3000], [1.0]),
        "gete": ([920], [0.12]),
    }
    for name, (t, dt) in expected.items():
        sim = specs[name].simulation
        assert sim["temperature_K"] == t and sim["timestep_fs"] == dt, name
    assert not specs["3bpa"].periodic and not specs["acac"].periodic and not specs["md17-aspirin"].periodic
    assert specs["lips"].periodic and specs["gete"].periodic and specs["lips20"].periodic
    # LiPS20: all 16 present materials, grouped as in the paper.
    l20 = specs["lips20"]
    assert len(l20.sources) == 16
    groups = {}
    for s in l20.sources.values():
        groups.setdefault(s.group, set()).add(s.id)
    assert groups["train"] == {"Li", "Li2S", "Li48P16S61", "P4S3", "Li7PS6"}
    assert groups["crystal"] == {"beta-Li3PS4", "Li2PS3-hex", "gamma-Li3PS4", "Li2PS3-orth"}
    assert len(groups["test"]) == 7
    for sid in l20.sources:
        assert f"lips20-{sid}" in specs


def test_cards_checksums_and_urls_match_upstream_list():
    """Every file of every card is in the upstream checksum list with the same sha256, and every
    upstream file is named by some card."""
    if MIRROR is None:
        pytest.skip("needs the mirror's SHA256SUMS")
    sums = dict(reversed(line.split()) for line in (MIRROR / "SHA256SUMS").read_text().splitlines() if line.strip())
    named = {}
    for spec in data.datasets().values():
        assert spec.url == UPSTREAM + "{path}"
        for rel, sha in spec.files:
            named[rel] = sha
    assert named == sums


def test_unknown_dataset_suggests_close_names():
    with pytest.raises(UnknownNameError) as e:
        data.get("md17-ethanl")
    assert "md17-ethanol" in str(e.value) and "Did you mean" in str(e.value)
    with pytest.raises(UnknownNameError, match="lips"):
        data.get("LIPS2")
    assert data.get("LiPS").name == "lips"  # case-insensitive
    with pytest.raises(UnknownNameError, match="split"):
        data.load("lips", "training")


@requires_data
def test_fetch_verify_and_list_through_cli(tmp_path):
    d = tmp_path / "d"
    cmd = [sys.executable, "-m", "jaxbench", "data"]
    env = dict(os.environ, JAXBENCH_DATA_MIRROR="")
    r = subprocess.run(cmd + ["fetch", "--all", "--quiet", "--mirror", str(MIRROR), "--data-dir", str(d)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd + ["verify", "--data-dir", str(d)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 mismatched, 0 not present" in r.stdout
    r = subprocess.run(cmd + ["list", "--json", "--data-dir", str(d)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert len(rows) >= 10 and all(rows[n]["present"] and rows[n]["verified"] for n in rows)
    assert rows["md17-ethanol"]["frames"] == {"train": 950, "val": 50, "test": 1000}
    assert rows["md17-ethanol"]["atoms"] == [9] and rows["md17-ethanol"]["elements"] == ["H", "C", "O"]
    assert rows["md17-aspirin"]["atoms"] == [21]
    assert rows["3bpa"]["frames"]["train"] == 500 and rows["3bpa"]["frames"]["test_600K"] == 2138
    assert rows["lips"]["atoms"] == [83] and sum(rows["lips"]["frames"].values()) == 1000
    assert rows["gete"]["atoms"] == [200] and rows["gete"]["frames"]["test"] == 300
    assert rows["lips20-Li48P16S61"]["atoms"] == [125]
    # A second fetch copies nothing and still succeeds.
    mtime = (d / "Datasets/md17/ethanol/train/nequip_npz.npz").stat().st_mtime_ns
    r = subprocess.run(cmd + ["fetch", "md17-ethanol", "--quiet", "--mirror", str(MIRROR), "--data-dir", str(d)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and (d / "Datasets/md17/ethanol/train/nequip_npz.npz").stat().st_mtime_ns == mtime
    # Corrupt one byte: verify fails and names the file.
    p = d / "Datasets/GeTe/data/test/nequip_npz.npz"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))
    r = subprocess.run(cmd + ["verify", "--data-dir", str(d)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "MISMATCH Datasets/GeTe/data/test/nequip_npz.npz" in r.stdout
    r = subprocess.run(cmd + ["list", "--data-dir", str(d)], capture_output=True, text=True, env=env)
    assert "CHECKSUM MISMATCH" in r.stdout


@requires_data
def test_every_dataset_loads_with_card_counts(data_root):
    """Every split of every dataset reads, with the frame and atom counts and elements of its card."""
    from ase.data import chemical_symbols

    for name, spec in data.datasets().items():
        for split in spec.splits:
            fr = data.load(name, split)
            assert len(fr) == spec.split_frames(split), (name, split)
            assert sorted(set(fr.n_atoms.tolist())) == spec.split_atoms(split), (name, split)
            els = {chemical_symbols[z] for z in np.unique(fr.numbers)}
            assert els <= set(spec.elements), (name, split)
            assert fr.info["dataset"] == name and fr.info["split"] == split
            assert fr.pbc.any() == spec.periodic, (name, split)
            assert fr.energy is not None and fr.forces is not None
            if spec.family == "lips20":
                assert fr.stress is not None


@requires_data
def test_load_contents_match_raw_files(data_root):
    raw = np.load(MIRROR / "Datasets/Data_lips/data/val/nequip_npz.npz")
    test = data.load("lips", "test")
    np.testing.assert_array_equal(test.positions.reshape(200, 83, 3), raw["pos"][800:1000])
    np.testing.assert_array_equal(test.energy, raw["energy"][800:1000, 0])
    np.testing.assert_array_equal(test.cell[0], raw["cell"])
    assert test.pbc.all()
    # 3BPA is stored in a 50 Å box flagged periodic: the card reads it as a molecule.
    bpa = data.load("3bpa", "test_600K")
    assert not bpa.pbc.any() and len(bpa) == 2138
    # Splits partition the LiPS file with no overlap.
    parts = [data.load("lips", s) for s in ("train", "val", "test")]
    allpos = np.concatenate([p.positions.reshape(len(p), -1) for p in parts])
    np.testing.assert_array_equal(allpos, raw["pos"].reshape(1000, -1))


@requires_data
def test_load_refuses_corrupt_file_and_names_it(tmp_path):
    d = tmp_path / "d"
    data.fetch(["md17-ethanol"], d, mirror=MIRROR, progress=False)
    p = d / "Datasets/md17/ethanol/val/nequip_npz.npz"
    p.write_bytes(p.read_bytes()[:1000])  # truncated
    with pytest.raises(ChecksumError) as e:
        data.load("md17-ethanol", "val", data_dir=d)
    assert str(p) in str(e.value)
    with pytest.raises(DataError, match="not in the data directory"):
        data.load("md17-aspirin", "val", data_dir=d, download=False)


def _fake_mirror(tmp_path, corrupt: bool) -> Path:
    m = tmp_path / "mirror"
    rel = "Datasets/md17/ethanol/val/nequip_npz.npz"
    (m / rel).parent.mkdir(parents=True)
    blob = (MIRROR / rel).read_bytes()
    if corrupt:
        blob = blob[:-10] + b"0123456789"
    (m / rel).write_bytes(blob)
    return m


@requires_data
def test_fetch_checksum_mismatch_leaves_no_partial_file(tmp_path):
    m = _fake_mirror(tmp_path, corrupt=True)
    d = tmp_path / "d"
    spec = data.get("md17-ethanol")
    with pytest.raises(ChecksumError, match="does not match"):
        # Restrict to the one file the fake mirror has by fetching a dataset subset by hand.
        rel, sha = [f for f in spec.files if "/val/" in f[0]][0]
        data._copy_verified(lambda: open(m / rel, "rb"), d / rel, sha, str(m / rel), None)
    assert not (d / rel).exists()
    assert list((d / rel).parent.iterdir()) == []  # temp file removed too
    with pytest.raises(DataError, match="mirror has no file"):
        data.fetch(["md17-ethanol"], d, mirror=m, progress=False)


@requires_data
def test_fetch_over_http_from_loopback_server(tmp_path):
    """The URL path (used for upstream) works against an HTTP server on 127.0.0.1 serving the mirror."""
    src = tmp_path / "srv"
    for rel, _ in data.get("md17-ethanol").files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MIRROR / rel, src / rel)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(src), **k)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        d = tmp_path / "d"
        res = data.fetch(["md17-ethanol"], d, mirror=None, base_url=f"http://127.0.0.1:{srv.server_port}",
                         progress=False)
        assert len(res) == 3 and all(r.state == "ok" for r in res)
        for rel, sha in data.get("md17-ethanol").files:
            assert hashlib.sha256((d / rel).read_bytes()).hexdigest() == sha
    finally:
        srv.shutdown()


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXBENCH_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("JAXBENCH_DATA_DIR")
    assert "jaxbench" in str(data.resolve_data_dir())


def test_cards_ship_with_the_package():
    from jaxbench import cards

    d = cards.card_dir("data")
    assert (d / "lips.yaml").is_file()
    assert (d / "lips.yaml").read_bytes() == (REPO / "data" / "lips.yaml").read_bytes()
