"""Fault injection: real `simulate` processes (tests/fault_sim.py) killed at seeded random moments and
resumed until they finish; the trajectory must equal an uninterrupted run's bit for bit, and no
temporary file or lock may remain. The default variant kills a few times; `-m slow` kills 20 times.
(Training under SIGKILL: tests/test_train.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxbench import trajectory
from jaxbench.md.resume import state_path

from .test_md_resume import same_file

SCRIPT = Path(__file__).with_name("fault_sim.py")


def launch(out, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def reference(tmp_path, *args):
    t0 = time.perf_counter()
    p = launch(tmp_path / "ref.h5", *args)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return tmp_path / "ref.h5", time.perf_counter() - t0


def kill_and_resume(out, n_kills: int, seconds: float, seed: int, *args) -> dict:
    """Kill (SIGKILL) a run at ``n_kills`` random moments in [0, seconds) of each attempt, resuming each
    time; then let it finish. Returns counts of kills that landed before / after the first committed chunk."""
    rng = np.random.default_rng(seed)
    landed = {"before_first_chunk": 0, "mid_run": 0, "after_finish": 0}
    for _ in range(n_kills):
        p = launch(out, "--resume", *args)
        time.sleep(float(rng.uniform(0.0, seconds)))
        had_state = state_path(out).exists()
        p.kill()
        _, err = p.communicate(timeout=120)
        if p.returncode == 0:
            landed["after_finish"] += 1
            break
        assert p.returncode == -signal.SIGKILL, err
        landed["mid_run" if had_state else "before_first_chunk"] += 1
    p = launch(out, "--resume", *args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return landed


def leftovers(d: Path):
    return sorted(p.name for p in d.iterdir() if ".tmp" in p.name or p.name.endswith(".lock"))


def test_sigterm_stops_after_the_chunk_and_resumes(tmp_path):
    args = ("--cells", "2", "--steps", "3000")
    ref, _ = reference(tmp_path, *args)
    out = tmp_path / "run.h5"
    p = launch(out, *args)
    deadline = time.time() + 300
    while not state_path(out).exists():  # the first chunk is on disk: the run is in its loop
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err and "stopped after step" in err
    info = trajectory.read_info(out)
    assert info["complete"] is False and 0 < info["steps_done"] < 3000
    assert leftovers(tmp_path) == []
    p = launch(out, "--resume", *args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    same_file(ref, out)


def test_sigkill_at_random_moments(tmp_path):
    args = ("--cells", "2", "--steps", "3000")
    ref, seconds = reference(tmp_path, *args)
    out = tmp_path / "run.h5"
    landed = kill_and_resume(out, 3, seconds, 0, *args)
    assert sum(landed.values()) >= 1
    same_file(ref, out)
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_sigkill_twenty_times(tmp_path):
    """The figure in BENCHMARKS.md (Reliability): 20 kills of one run, each at a random moment."""
    args = ("--cells", "3", "--steps", "20000")  # ~2.5 min of MD: 20 kills within 20 s of each start stay mid-run
    ref, _ = reference(tmp_path, *args)
    out = tmp_path / "run.h5"
    landed = kill_and_resume(out, 20, 20.0, 1, *args)
    print("kills:", landed)
    assert landed["mid_run"] >= 10 and landed["after_finish"] == 0
    same_file(ref, out)
    assert leftovers(tmp_path) == []
