"""Run directories and trajectories are locked while written (jaxbench.runs.locked): a second writer is
refused with the owner named, a lock left by a dead process is taken over, nesting in one process works."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxbench import md, runs
from jaxbench.runs import RunLockedError, lock_path, locked

HOLD = """
import sys, time
from jaxbench import runs
with runs.locked(sys.argv[1], file=sys.argv[2] == "file"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of a path until the test ends."""
    procs = []

    def hold(path, file=False):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "file" if file else "dir"], stdout=subprocess.PIPE,
                             text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_writer_is_refused_with_the_owner_named(tmp_path, holder):
    run = tmp_path / "run"
    p = holder(run)
    with pytest.raises(RunLockedError, match=rf"run directory .*run is being written by pid {p.pid} on this host"):
        with locked(run):
            pass
    assert json.loads(lock_path(run).read_text())["pid"] == p.pid  # the owner's lock is untouched


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    lock_path(run).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "then"}))
    with pytest.warns(RuntimeWarning, match=f"stale lock of pid {dead}"):
        with locked(run):
            assert json.loads(lock_path(run).read_text())["pid"] != dead
    assert not lock_path(run).exists() and not list(run.glob("*.stale-*"))


def test_a_lock_from_another_host_is_reported_with_the_file_to_delete(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock_path(run).write_text(json.dumps({"pid": 1, "host": "node-elsewhere", "started": "t", "command": "jaxbench train"}))
    with pytest.raises(RunLockedError, match=r"host node-elsewhere .*jaxbench train.*delete .*\.jaxbench\.lock"):
        with locked(run):
            pass


def test_an_unreadable_lock_is_stale_only_once_it_is_old(tmp_path):
    """A lock being written has no JSON yet for a moment: a young one is waited for, an old one taken over."""
    run = tmp_path / "run"
    run.mkdir()
    lock_path(run).write_text("")
    t0 = time.perf_counter()
    old = time.time() - 60
    import os

    os.utime(lock_path(run), (old, old))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        with locked(run):
            pass
    assert time.perf_counter() - t0 < 2.0


def test_nested_locks_in_one_process_and_release(tmp_path):
    run = tmp_path / "run"
    with locked(run):
        with locked(run):  # bench -> its own stage on the same directory
            assert lock_path(run).exists()
        assert lock_path(run).exists()
    assert not lock_path(run).exists()
    with pytest.raises(ValueError):
        with locked(run):
            raise ValueError("a crash inside")
    assert not lock_path(run).exists()  # released on error too


def test_simulate_refuses_a_trajectory_another_process_writes(tmp_path, holder):
    out = tmp_path / "traj.h5"
    p = holder(out, file=True)
    pos = np.array([[0, 0, 0], [0, 2.9, 2.9], [2.9, 0, 2.9], [2.9, 2.9, 0]], float) * 2.0
    start = md.Start.make(pos, [18] * 4, np.eye(3) * 11.6, True)
    proto = md.Protocol(ensemble="nve", temperature_K=100.0, timestep_fs=5.0, steps=20, replicas=1, save_every=10,
                        chunk_steps=20)
    with pytest.raises(RunLockedError, match=f"trajectory .*traj.h5 is being written by pid {p.pid}"):
        md.simulate(md.lennard_jones(cutoff=5.0), start, proto, out=out, progress=False)
    assert not out.exists()


def test_train_refuses_a_run_directory_another_process_writes(tmp_path, holder):
    from jaxbench.train import train

    run = tmp_path / "run"
    p = holder(run)
    with pytest.raises(RunLockedError, match=f"training run .* pid {p.pid}"):
        train(model="schnet-small", dataset="md17-ethanol", n_train=2, n_val=2, out=run, max_epochs=1, progress=False)
    assert not (run / "checkpoints").exists()
    assert runs.LOCK_NAME == ".jaxbench.lock"
