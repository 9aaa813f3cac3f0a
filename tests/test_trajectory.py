"""H5MD trajectories: layout, round trip, extxyz export, and a killed simulation's file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from jaxbench import md, trajectory
from jaxbench.errors import JaxbenchError

REPO = Path(__file__).resolve().parents[1]


def _small_start(replicas=2):
    a = 5.8
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]) * a
    return md.Start.make(base, [18] * 4, np.eye(3) * a, True, replicas=replicas)


def test_writer_layout_roundtrip_and_extxyz(tmp_path):
    rng = np.random.default_rng(0)
    R, N = 2, 3
    path = tmp_path / "t.h5"
    w = trajectory.TrajectoryWriter(path, [1, 8, 1], [1.008, 15.999, 1.008], np.zeros((3, 3)), [False] * 3, R, 0.5,
                                    metadata={"protocol": {"ensemble": "nve"}, "seed": 3})
    chunks = []
    for c in range(3):
        steps = np.arange(c * 4 + 1, c * 4 + 5) * 10
        part = {k: rng.normal(size=(R, 4, N, 3)) for k in trajectory.PARTICLE_FIELDS}
        obs = {k: rng.normal(size=(R, 4)) for k in trajectory.OBSERVABLES}
        w.append(steps, part, obs)
        chunks.append((steps, part, obs))
        if c == 0:  # another process reads the committed frames while the writer holds the file open
            w.flush()
            code = f"from jaxbench import trajectory; print(len(trajectory.read({str(path)!r})['step']))"
            live = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            assert live.returncode == 0 and live.stdout.strip() == "4", live.stderr
    w.set_status([False, True], [-1, 75], [0, 2])
    w.close()
    with pytest.raises(JaxbenchError, match="exists"):
        trajectory.TrajectoryWriter(path, [1], [1.0], np.zeros((3, 3)), [False] * 3, 1, 1.0)

    with h5py.File(path, "r") as f:  # the H5MD layout, as documented
        assert list(f["h5md"].attrs["version"]) == [1, 1]
        assert "creator" in f["h5md"] and "author" in f["h5md"]
        assert sorted(f["particles"]) == ["replica_000", "replica_001"]
        g = f["particles/replica_001"]
        assert g["position/value"].shape == (12, N, 3) and g["position/value"].attrs["unit"] == "angstrom"
        assert g["velocity/value"].attrs["unit"] == "angstrom fs-1"
        assert list(g["box"].attrs["boundary"]) == [b"none"] * 3
        assert g["box/edges"].shape == (3, 3)
        np.testing.assert_array_equal(g["species"][:], [1, 8, 1])
        np.testing.assert_allclose(f["observables/replica_000/temperature/time"][:4], [5.0, 10.0, 15.0, 20.0])
        assert f["observables/replica_000/potential_energy/value"].attrs["unit"] == "eV"

    tr = trajectory.read(path)
    np.testing.assert_array_equal(tr["step"], np.concatenate([c[0] for c in chunks]))
    for k in trajectory.PARTICLE_FIELDS:
        np.testing.assert_array_equal(tr[k], np.concatenate([c[1][k] for c in chunks], axis=1))
    for k in trajectory.OBSERVABLES:
        np.testing.assert_array_equal(tr[k], np.concatenate([c[2][k] for c in chunks], axis=1))
    assert tr["info"]["protocol"] == {"ensemble": "nve"} and tr["info"]["complete"]
    assert list(tr["info"]["failure_step"]) == [-1, 75]

    import ase.io
    import ase.units

    n = trajectory.to_extxyz(path, tmp_path / "t.extxyz", replica=1)
    images = ase.io.read(tmp_path / "t.extxyz", ":")
    assert n == len(images) == 12
    np.testing.assert_allclose(images[5].positions, tr["position"][1, 5], atol=1e-6)
    np.testing.assert_allclose(images[5].get_forces(), tr["force"][1, 5], atol=1e-6)
    np.testing.assert_allclose(images[5].get_velocities() * ase.units.fs, tr["velocity"][1, 5], atol=1e-6)
    assert images[5].info["step"] == tr["step"][5]
    assert images[5].get_potential_energy() == pytest.approx(tr["potential_energy"][1, 5])


def test_simulate_writes_file_matching_arrays(tmp_path):
    st = _small_start()
    p = md.Protocol(ensemble="nvt_langevin", temperature_K=100.0, timestep_fs=5.0, steps=60, save_every=10, chunk_steps=20)
    lj = md.lennard_jones(cutoff=5.0)
    res = md.simulate(lj, st, p, out=tmp_path / "run.h5", keep_arrays=True, seed=4, progress=False)
    tr = trajectory.read(tmp_path / "run.h5")
    assert list(tr["step"]) == [0, 10, 20, 30, 40, 50, 60]
    for k in ("position", "velocity", "force", "potential_energy", "temperature", "conserved_energy"):
        np.testing.assert_allclose(tr[k], res.arrays[k], rtol=1e-12)
    assert tr["info"]["complete"] and tr["info"]["steps_done"] == 60 and tr["info"]["protocol"]["ensemble"] == "nvt_langevin"
    np.testing.assert_allclose(tr["cell"], st.cell)
    # forces on disk are the model's forces at the saved positions
    import jax

    from jaxbench.graph import md_graph
    from jaxbench.neighbors import md_neighbor_list

    nl = md_neighbor_list(st.cell, st.pbc, 5.0, skin=0.0)
    x = tr["position"][1, 3]
    nb = nl.allocate(x)
    f = -jax.grad(lambda y: lj.fn(lj.params, md_graph(y, st.numbers, st.cell, st.pbc, nb)))(x)
    np.testing.assert_allclose(tr["force"][1, 3], f, atol=1e-10)
    with pytest.raises(JaxbenchError, match="exists"):
        md.simulate(lj, st, p, out=tmp_path / "run.h5", progress=False)
    md.simulate(lj, st, p.replace(steps=20), out=tmp_path / "run.h5", overwrite=True, progress=False)
    assert list(trajectory.read(tmp_path / "run.h5")["step"]) == [0, 10, 20]


CHILD = textwrap.dedent(
    """
    import sys, jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jaxbench import md
    a = 5.8
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]) * a
    st = md.Start.make(base, [18] * 4, np.eye(3) * a, True, replicas=2)
    p = md.Protocol(ensemble="nvt_nose_hoover", temperature_K=100.0, timestep_fs=5.0, steps=10_000_000,
                    save_every=10, chunk_steps=50)
    def cb(info):
        print("CHUNK", info["chunk"], flush=True)
    md.simulate(md.lennard_jones(cutoff=5.0), st, p, out=sys.argv[1], progress=False, callback=cb)
    """
)


@pytest.mark.slow  # SIGKILLed simulate processes leave readable, resumable files: tests/test_faults.py (default)
def test_killed_run_leaves_readable_file(tmp_path):
    """SIGKILL a real simulation process after it reported chunks written: every finished chunk
    must read back, with consistent steps and finite values."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "killed.h5"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    seen = 0
    try:
        deadline = time.time() + 240
        while seen < 3 and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("CHUNK"):
                seen += 1
        assert seen == 3, proc.stderr.read() if proc.poll() is not None else "child too slow"
        time.sleep(0.05)  # let it get into the next chunks
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    tr = trajectory.read(out)
    n = len(tr["step"])
    assert n >= 1 + 3 * 5  # the initial frame and at least 3 chunks of 5 frames
    assert (n - 1) % 5 == 0  # only whole chunks are committed
    np.testing.assert_array_equal(tr["step"], np.arange(n) * 10)
    assert tr["position"].shape == (2, n, 4, 3)
    assert np.all(np.isfinite(tr["position"])) and np.all(np.isfinite(tr["potential_energy"]))
    assert np.all(tr["temperature"][:, 1:] > 1.0)  # real data, not unwritten zeros
    assert not tr["info"]["complete"]
    assert tr["info"]["steps_done"] == tr["step"][-1]
