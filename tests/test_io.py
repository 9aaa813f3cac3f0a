"""Tests for jaxbench.io: readers of nequip npz, DeePMD-kit npy and ASE files, and the extxyz writer.

Bad-input tests build small synthetic files in tmp_path (mostly slices of real data) and check that
the DataError names the file, key, frame and atoms at fault.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jaxbench import io
from jaxbench.errors import DataError
from jaxbench.frames import Frames

DATA = Path(os.environ.get("JAXBENCH_DATA_MIRROR") or Path(__file__).resolve().parents[2] / "shared/data/egraffbench")
ETHANOL = DATA / "Datasets/md17/ethanol/train/nequip_npz.npz"
LIPS = DATA / "Datasets/Data_lips/data/val/nequip_npz.npz"
BPA = DATA / "Datasets/3bpa/data/train/nequip_npz.npz"
LI2S = DATA / "Datasets/All_LiPS20/Li2S/3000K/deepmd/Li64P0S32"
LI = DATA / "Datasets/All_LiPS20/Li/3000K/deepmd/Li54P0S0"


def need(*paths):
    for p in paths:
        if not p.exists():
            pytest.skip(f"reference data not found: {p} (set JAXBENCH_DATA_MIRROR)")


def ethanol_arrays(n=6):
    """A slice of real MD17 ethanol as a dict of nequip npz arrays."""
    need(ETHANOL)
    with np.load(ETHANOL) as z:
        return {k: (z[k][:n].copy() if z[k].ndim and z[k].shape[0] == 950 else z[k].copy()) for k in z.files}


def periodic_arrays(n=4):
    """A slice of real LiPS (triclinic, periodic)."""
    need(LIPS)
    with np.load(LIPS) as z:
        return {k: (z[k][:n].copy() if z[k].ndim and z[k].shape[0] == 1000 else z[k].copy()) for k in z.files}


def write_npz(tmp_path, arrays, name="data.npz"):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def deepmd_copy(tmp_path, n=5, sets=(5,), name="Li64P0S32"):
    """A small DeePMD-kit system built from real Li2S frames; `sets` = frames per set."""
    need(LI2S)
    out = tmp_path / name
    out.mkdir()
    shutil.copy(LI2S / "type.raw", out / "type.raw")
    shutil.copy(LI2S / "type_map.raw", out / "type_map.raw")
    start = 0
    for k, m in enumerate(sets):
        s = out / f"set.{k:03d}"
        s.mkdir()
        for key in ("coord", "force", "energy", "box", "virial"):
            a = np.load(LI2S / "set.000" / f"{key}.npy")
            np.save(s / f"{key}.npy", a[start : start + m])
        start += m
    return out


def message(excinfo) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------------------------------------------
# good inputs: real data
# ------------------------------------------------------------------------------------------------
def test_md17_ethanol_train():
    need(ETHANOL)
    fr = io.read_nequip_npz(ETHANOL)
    assert len(fr) == 950 and set(fr.n_atoms) == {9}
    assert set(fr.species) == {1, 6, 8}  # C H O
    assert fr.energy.shape == (950,) and fr.forces.shape == (950 * 9, 3) and fr.stress is None
    assert not fr.pbc.any()
    assert fr.source[0] == f"{ETHANOL}#0" and fr.source[-1] == f"{ETHANOL}#949"
    with np.load(ETHANOL) as z:
        np.testing.assert_array_equal(fr.positions, z["pos"].reshape(-1, 3))
        np.testing.assert_array_equal(fr.energy, z["energy"][:, 0])


def test_lips_triclinic_periodic():
    need(LIPS)
    fr = io.read(LIPS)
    assert len(fr) == 1000 and set(fr.n_atoms) == {83}
    assert fr.pbc.all()
    cell = fr.cell[0]
    assert np.abs(cell - np.diag(np.diag(cell))).max() > 1.0  # triclinic
    assert np.linalg.det(cell) > 0
    assert set(fr.species) == {3, 15, 16}


def test_pbc_override_for_molecule_in_fake_box():
    need(BPA)
    with np.load(BPA) as z:
        assert z["pbc"].all()  # the file flags a 50 Å box as periodic
    fr = io.read_nequip_npz(BPA, pbc=False)
    assert len(fr) == 500 and not fr.pbc.any()
    np.testing.assert_allclose(fr.cell[0], 50 * np.eye(3))  # the cell is kept


def test_lips20_deepmd_stress_is_minus_virial_over_volume():
    need(LI2S)
    fr = io.read_deepmd(LI2S)
    types = np.loadtxt(LI2S / "type.raw", dtype=int)
    assert len(types) == 96 and (types == 0).sum() == 64 and (types == 2).sum() == 32  # Li64 S32
    assert len(fr) == 1000 and set(fr.n_atoms) == {96} and fr.pbc.all()
    assert sorted(set(fr.species)) == [3, 16]
    s = LI2S / "set.000"
    box = np.load(s / "box.npy").reshape(-1, 3, 3)
    virial = np.load(s / "virial.npy").reshape(-1, 3, 3)
    volume = np.abs(np.linalg.det(box))
    np.testing.assert_allclose(fr.stress, -virial / volume[:, None, None], rtol=1e-14, atol=0)
    np.testing.assert_array_equal(fr.positions, np.load(s / "coord.npy").reshape(-1, 3))
    np.testing.assert_array_equal(fr.forces, np.load(s / "force.npy").reshape(-1, 3))
    np.testing.assert_array_equal(fr.energy, np.load(s / "energy.npy"))
    np.testing.assert_array_equal(fr.cell, box)
    # A 3000 K melt: the configurational pressure -tr(stress)/3 is positive (a few GPa).
    pressure_gpa = -np.trace(fr.stress, axis1=1, axis2=2).mean() / 3 * 160.21766
    assert 0.5 < pressure_gpa < 20
    assert fr.source[3] == f"{s}#3"


def test_deepmd_multiple_sets_sorted_and_sources(tmp_path):
    d = deepmd_copy(tmp_path, sets=(3, 2))
    fr = io.read_deepmd(d)
    assert len(fr) == 5
    energy = np.load(LI2S / "set.000/energy.npy")[:5]
    np.testing.assert_array_equal(fr.energy, energy)
    assert [str(x) for x in fr.source] == [f"{d}/set.000#{k}" for k in range(3)] + [f"{d}/set.001#{k}" for k in range(2)]


def test_deepmd_nopbc_marker(tmp_path):
    d = deepmd_copy(tmp_path, sets=(2,))
    (d / "nopbc").touch()
    for s in d.glob("set.*"):
        (s / "virial.npy").unlink()  # a molecule has no virial
    fr = io.read_deepmd(d)
    assert not fr.pbc.any() and fr.stress is None


def test_read_dispatch(tmp_path):
    d = deepmd_copy(tmp_path, sets=(2,))
    assert len(io.read(d)) == 2  # system dir
    assert len(io.read(tmp_path)) == 2  # folder of systems
    p = write_npz(tmp_path, ethanol_arrays(3))
    assert len(io.read(p)) == 3
    assert len(io.read(p, format="nequip-npz")) == 3
    assert len(io.read(d, format="deepmd")) == 2
    x = tmp_path / "a.extxyz"
    io.write_extxyz(io.read(p), x)
    assert len(io.read(x)) == 3


def test_nequip_aliases_and_key_override(tmp_path):
    a = ethanol_arrays(4)
    sgdml = {"R": a["pos"], "E": a["energy"], "F": a["forces"], "z": a["atomic_numbers"]}
    fr = io.read_nequip_npz(write_npz(tmp_path, sgdml))
    np.testing.assert_array_equal(fr.positions, a["pos"].reshape(-1, 3))
    assert not fr.pbc.any() and not fr.cell.any()
    renamed = {"pos": a["pos"], "U0": a["energy"][:, 0], "forces": a["forces"], "numbers": np.tile(a["atomic_numbers"], (4, 1))}
    fr = io.read_nequip_npz(write_npz(tmp_path, renamed, "b.npz"), keys={"energy": "U0"})
    np.testing.assert_array_equal(fr.energy, a["energy"][:, 0])


def test_nequip_virial_becomes_stress(tmp_path):
    a = periodic_arrays(3)
    virial = np.random.default_rng(0).normal(size=(3, 3, 3))
    a["virial"] = virial
    fr = io.read_nequip_npz(write_npz(tmp_path, a))
    np.testing.assert_allclose(fr.stress, -virial / abs(np.linalg.det(a["cell"])), rtol=1e-14)


# ------------------------------------------------------------------------------------------------
# ASE formats and the extxyz writer
# ------------------------------------------------------------------------------------------------
def labelled_atoms():
    """Two real periodic Li2S frames with energy, forces and stress."""
    need(LI2S)
    return io.read_deepmd(LI2S)[[0, 7]]


@pytest.mark.parametrize("ext", ["extxyz", "db", "traj"])
def test_read_ase_formats(tmp_path, ext):
    import ase.io

    ref = labelled_atoms()
    p = tmp_path / f"frames.{ext}"
    ase.io.write(p, ref.to_ase())  # SinglePointCalculator results
    fr = io.read_ase(p)
    assert len(fr) == 2 and list(fr.n_atoms) == [96, 96]
    # ase's extxyz writer rounds per-atom columns to 8 decimals; db and traj are exact binary
    atol = 1e-7 if ext == "extxyz" else 0
    np.testing.assert_allclose(fr.positions, ref.positions, atol=atol, rtol=0)
    np.testing.assert_allclose(fr.forces, ref.forces, atol=atol, rtol=0)
    np.testing.assert_allclose(fr.energy, ref.energy, atol=1e-12, rtol=0)
    np.testing.assert_allclose(fr.stress, ref.stress, atol=1e-12, rtol=0)
    np.testing.assert_allclose(fr.cell, ref.cell, atol=1e-12, rtol=0)
    assert fr.pbc.all()
    assert fr.source[1] == f"{p}#1"


def test_read_ase_different_sizes_and_index(tmp_path):
    import ase.io

    need(ETHANOL)
    mol = io.read_nequip_npz(ETHANOL)[[0, 1]]
    per = labelled_atoms()
    p = tmp_path / "mixed.extxyz"
    ase.io.write(p, mol.to_ase() + per.to_ase())  # without stress on the molecules ...
    with pytest.raises(DataError) as e:
        io.read_ase(p)
    assert "frame 0" in message(e) and "stress" in message(e) and p.name in message(e)
    fr = io.read_ase(p, index="2:")  # ... the periodic frames alone are fine
    assert list(fr.n_atoms) == [96, 96] and [str(s) for s in fr.source] == [f"{p}#2", f"{p}#3"]
    fr = io.read_ase(p, index=":2")
    assert list(fr.n_atoms) == [9, 9]
    fr = io.read_ase(p, index=-1)
    assert list(fr.n_atoms) == [96] and fr.source[0] == f"{p}#3"
    # frames of different sizes in one Frames
    need(LIPS)
    lips = io.read_nequip_npz(LIPS)[[5]]
    q = tmp_path / "sizes.extxyz"
    io.write_extxyz(Frames.concatenate([mol, lips]), q)
    fr = io.read_ase(q)
    assert list(fr.n_atoms) == [9, 9, 83] and len(fr.positions) == 101
    np.testing.assert_array_equal(fr[2].positions, lips.positions)
    np.testing.assert_array_equal(fr.pbc, [[False] * 3, [False] * 3, [True] * 3])


def test_read_ase_mixed_energy_labels_names_first_unlabelled_frame(tmp_path):
    import ase.io

    need(ETHANOL)
    atoms = io.read_nequip_npz(ETHANOL)[:4].to_ase()
    atoms[2].calc = None
    p = tmp_path / "partial.extxyz"
    ase.io.write(p, atoms)
    with pytest.raises(DataError) as e:
        io.read_ase(p)
    msg = message(e)
    assert p.name in msg and "key 'energy'" in msg and "frame 2" in msg


def test_write_extxyz_round_trip_exact(tmp_path):
    need(ETHANOL)
    for ref in (labelled_atoms(), io.read_nequip_npz(ETHANOL)[:5]):
        p = tmp_path / "out.extxyz"
        io.write_extxyz(ref, p)
        fr = io.read_ase(p)
        for key in ("positions", "forces", "cell", "energy"):
            np.testing.assert_allclose(getattr(fr, key), getattr(ref, key), atol=1e-10, rtol=0)
        if ref.stress is not None:
            np.testing.assert_allclose(fr.stress, ref.stress, atol=1e-10, rtol=0)
        else:
            assert fr.stress is None
        np.testing.assert_array_equal(fr.numbers, ref.numbers)
        np.testing.assert_array_equal(fr.pbc, ref.pbc)
        np.testing.assert_array_equal(fr.positions, ref.positions)  # in fact bit-identical
    assert [x.name for x in tmp_path.iterdir()] == ["out.extxyz"]  # no temporary file left


def test_write_extxyz_is_atomic_on_failure(tmp_path):
    p = tmp_path / "keep.extxyz"
    p.write_text("old")

    class Broken:
        def __len__(self):
            return 1

        def frame(self, i):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        io.write_extxyz(Broken(), p)
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["keep.extxyz"]


# ------------------------------------------------------------------------------------------------
# bad inputs: one test each, checking that the message names what it must
# ------------------------------------------------------------------------------------------------
def test_missing_key(tmp_path):
    a = ethanol_arrays()
    del a["forces"]
    p = write_npz(tmp_path, a)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    msg = message(e)
    assert p.name in msg and "'forces'" in msg and "keys present" in msg and "pos" in msg


def test_forces_shape_disagrees_with_positions(tmp_path):
    a = ethanol_arrays()
    a["forces"] = a["forces"][:, :8]
    p = write_npz(tmp_path, a)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    msg = message(e)
    assert p.name in msg and "key 'forces'" in msg and "(6, 8, 3)" in msg and "(6, 9, 3)" in msg


def test_energy_frame_count_disagrees_npz(tmp_path):
    a = ethanol_arrays()
    a["energy"] = a["energy"][:5]
    p = write_npz(tmp_path, a)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    assert p.name in message(e) and "key 'energy'" in message(e)


def test_deepmd_energy_frame_count_disagrees_with_coord(tmp_path):
    d = deepmd_copy(tmp_path, sets=(3, 4))
    e_path = d / "set.001/energy.npy"
    np.save(e_path, np.load(e_path)[:3])
    with pytest.raises(DataError) as e:
        io.read_deepmd(d)
    msg = message(e)
    assert "set.001/energy.npy" in msg and "key 'energy'" in msg and "3 frames" in msg and "4" in msg


def test_deepmd_atom_count_disagrees_with_type_raw(tmp_path):
    d = deepmd_copy(tmp_path, sets=(3,))
    (d / "type.raw").write_text("\n".join(["0"] * 95) + "\n")
    with pytest.raises(DataError) as e:
        io.read_deepmd(d)
    msg = message(e)
    assert "set.000/coord.npy" in msg and "key 'coord'" in msg and "95 atoms" in msg and "96" in msg


def test_deepmd_force_atom_count(tmp_path):
    d = deepmd_copy(tmp_path, sets=(3,))
    f_path = d / "set.000/force.npy"
    np.save(f_path, np.load(f_path)[:, :-3])
    with pytest.raises(DataError) as e:
        io.read_deepmd(d)
    assert "set.000/force.npy" in message(e) and "key 'force'" in message(e)


@pytest.mark.parametrize(
    "key, where, bad",
    [("pos", (3, 5, 1), np.nan), ("pos", (2, 4, 0), np.inf), ("forces", (4, 7, 2), -np.inf), ("forces", (1, 0, 0), np.nan)],
)
def test_non_finite_per_atom(tmp_path, key, where, bad):
    a = ethanol_arrays()
    a[key][where] = bad
    p = write_npz(tmp_path, a)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    msg = message(e)
    name = {"pos": "positions", "forces": "forces"}[key]
    assert p.name in msg and f"key '{name}'" in msg and f"frame {where[0]}" in msg and f"atom {where[1]}" in msg
    assert "nan" in msg.lower() or "inf" in msg.lower()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_energy(tmp_path, bad):
    a = ethanol_arrays()
    a["energy"][4, 0] = bad
    p = write_npz(tmp_path, a)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    assert p.name in message(e) and "key 'energy'" in message(e) and "frame 4" in message(e)


def test_non_finite_deepmd_force_names_set_and_frame(tmp_path):
    d = deepmd_copy(tmp_path, sets=(3, 3))
    f_path = d / "set.001/force.npy"
    f = np.load(f_path)
    f[2, 3 * 17 + 1] = np.nan  # set.001 frame 2 atom 17
    np.save(f_path, f)
    with pytest.raises(DataError) as e:
        io.read_deepmd(d)
    msg = message(e)
    assert "set.001" in msg and "frame 2" in msg and "atom 17" in msg and "key 'forces'" in msg


def test_atoms_too_close(tmp_path):
    a = ethanol_arrays()
    a["pos"][3, 5] = a["pos"][3, 2] + [0.05, 0.0, 0.0]
    p = write_npz(tmp_path, a)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    msg = message(e)
    assert p.name in msg and "frame 3" in msg and "atoms 2 " in msg and "and 5 " in msg and "0.05" in msg
    assert len(io.read_nequip_npz(p, validate=False)) == 6


def test_atoms_too_close_names_frame_number_in_file(tmp_path):
    """Reading a subset, the error gives the frame's number in the file, not in the subset."""
    need(ETHANOL)
    ref = io.read_nequip_npz(ETHANOL)[:6]
    pos = ref.positions.copy()
    off = ref.offsets
    pos[off[4] + 6] = pos[off[4] + 1] + [0.0, 0.03, 0.0]
    p = tmp_path / "close.extxyz"
    io.write_extxyz(ref.replace(positions=pos), p)
    with pytest.raises(DataError) as e:
        io.read_ase(p, index="2:")
    msg = message(e)
    assert p.name in msg and "frame 4" in msg and "atoms 1 " in msg and "and 6 " in msg


def test_atoms_too_close_through_periodic_image(tmp_path):
    a = periodic_arrays(3)
    cell = a["cell"]
    a["pos"][1, 10] = a["pos"][1, 3] + cell[0] + [0.02, 0.0, 0.0]  # atom 10 is an image of atom 3
    p = write_npz(tmp_path, a)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    msg = message(e)
    assert p.name in msg and "frame 1" in msg and "atoms 3 " in msg and "and 10 " in msg


def test_singular_cell(tmp_path):
    a = periodic_arrays(3)
    cell = np.broadcast_to(a["cell"], (3, 3, 3)).copy()
    cell[2, 2] = cell[2, 0] + cell[2, 1]  # third vector in the plane of the first two
    a["cell"] = cell
    p = write_npz(tmp_path, a)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    msg = message(e)
    assert p.name in msg and "key 'cell'" in msg and "frame 2" in msg and "singular" in msg


def test_left_handed_cell(tmp_path):
    a = periodic_arrays(3)
    a["cell"] = a["cell"][[1, 0, 2]]  # swapping two lattice vectors flips the handedness
    p = write_npz(tmp_path, a)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    msg = message(e)
    assert p.name in msg and "key 'cell'" in msg and "frame 0" in msg and "left-handed" in msg


def test_pbc_without_cell(tmp_path):
    a = ethanol_arrays()
    del a["cell"]
    a["pbc"] = np.array([True, True, True])
    p = write_npz(tmp_path, a)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    msg = message(e)
    assert p.name in msg and "key 'cell'" in msg and "frame 0" in msg and "needs a cell" in msg
    assert not io.read_nequip_npz(p, pbc=False).pbc.any()  # the override fixes it


def test_truncated_npz(tmp_path):
    need(ETHANOL)
    data = ETHANOL.read_bytes()
    p = tmp_path / "truncated.npz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    assert p.name in message(e) and "truncated or corrupt" in message(e)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no raw zipfile traceback
    with pytest.raises(DataError):
        io.read(p)


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage bytes, not a zip" * 10, b"PK\x03\x04" + b"\xff" * 200])
def test_garbage_npz(tmp_path, content):
    p = tmp_path / "garbage.npz"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(p)
    assert p.name in message(e)
    assert e.value.__cause__ is None


def test_bad_npy_header_inside_npz(tmp_path):
    a = ethanol_arrays()
    p = write_npz(tmp_path, a)
    q = tmp_path / "badheader.npz"
    with zipfile.ZipFile(p) as zin, zipfile.ZipFile(q, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "forces.npy":
                data = b"\x93NUMPY\x01\x00garbage header" + data[40:]
            zout.writestr(item, data)
    with pytest.raises(DataError) as e:
        io.read_nequip_npz(q)
    assert q.name in message(e) and "key 'forces'" in message(e)


def test_deepmd_missing_type_map(tmp_path):
    d = deepmd_copy(tmp_path, sets=(2,))
    (d / "type_map.raw").unlink()
    with pytest.raises(DataError) as e:
        io.read_deepmd(d)
    assert "type_map.raw" in message(e) and str(d) in message(e)
    assert sorted(set(io.read_deepmd(d, type_map=["Li", "P", "S"]).species)) == [3, 16]


def test_deepmd_set_missing_force(tmp_path):
    d = deepmd_copy(tmp_path, sets=(2, 2))
    (d / "set.001/force.npy").unlink()
    with pytest.raises(DataError) as e:
        io.read_deepmd(d)
    msg = message(e)
    assert "set.001/force.npy" in msg and "missing" in msg


def test_deepmd_virial_in_some_sets_only(tmp_path):
    d = deepmd_copy(tmp_path, sets=(2, 2))
    (d / "set.000/virial.npy").unlink()
    with pytest.raises(DataError) as e:
        io.read_deepmd(d)
    assert "set.000/virial.npy" in message(e)


def test_deepmd_type_index_out_of_range(tmp_path):
    d = deepmd_copy(tmp_path, sets=(2,))
    types = (d / "type.raw").read_text().split()
    types[40] = "7"
    (d / "type.raw").write_text("\n".join(types))
    with pytest.raises(DataError) as e:
        io.read_deepmd(d)
    assert "type.raw" in message(e) and "atom 40" in message(e)


def test_unknown_format(tmp_path):
    p = tmp_path / "thing.unknownext"
    p.write_bytes(b"\x00\x01\x02 not a structure file")
    with pytest.raises(DataError) as e:
        io.read(p)
    assert p.name in message(e)
    with pytest.raises(DataError):
        io.read(p, format="no-such-format")
    with pytest.raises(DataError) as e:
        io.read(tmp_path / "does-not-exist.npz")
    assert "does-not-exist.npz" in message(e)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError):
        io.read(tmp_path / "emptydir")
