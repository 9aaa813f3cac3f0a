"""Fault injection: real `simulate` processes (tests/fault_sim.py) killed at seeded random moments and
resumed until they finish; the trajectory must equal an uninterrupted run's bit for bit, and no
temporary file or lock may remain. The default variant kills a few times; `-m slow` kills 20 times.
The same for `train` and `bench` (slow)."""

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
from jaxbench.md.resume import load, state_path

from .test_md_resume import same_file

SCRIPT = Path(__file__).with_name("fault_sim.py")


def launch(out, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def reference(tmp_path, *args):
    """The uninterrupted run; returns (file, seconds until its first chunk was on disk, seconds per chunk after)."""
    t0 = time.perf_counter()
    out = tmp_path / "ref.h5"
    p = launch(out, *args)
    while not state_path(out).exists() and p.poll() is None:
        time.sleep(0.01)
    first = time.perf_counter() - t0
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    return out, first, (time.perf_counter() - t0 - first) / max(1, load(state_path(out)).chunks_done - 1)


def chunks_done(out) -> int:
    try:
        return load(state_path(out)).chunks_done
    except Exception:  # noqa: BLE001 - not there yet
        return 0


def kill_and_resume(out, n_kills: int, timing: tuple, seed: int, *args, start=None, progress=None, next_units=4,
                    record=None) -> dict:
    """SIGKILL a run ``n_kills`` times and resume it each time, then let it finish. Kill moments are drawn in
    the run's own time, so that the machine's load does not move them: every fourth kill at a random moment
    of the start-up (import, allocation, compile, first chunk), the others at a random chunk of what is
    left plus a random fraction of a chunk (inside the compiled chunk or while its frames and state are
    being written). ``start(out, *args)`` launches a resuming process and ``progress(out)`` counts its
    committed units (default: tests/fault_sim.py and its chunks); a mid-run kill waits for 1 to ``next_units``
    more. Returns where the kills landed (and ``record(out)`` after each kill under "stages", if given)."""
    start = start or (lambda o, *a: launch(o, "--resume", *a))
    progress = progress or chunks_done
    first_s, chunk_s = timing
    rng = np.random.default_rng(seed)
    landed = {"during_start": 0, "mid_run": 0, "after_finish": 0, "stages": []}
    for k in range(n_kills):
        done = progress(out)
        p = start(out, *args)
        if k % 4 == 0:
            time.sleep(float(rng.uniform(0.0, first_s)))
        else:
            target = done + 1 + int(rng.integers(0, next_units))
            while progress(out) < target and p.poll() is None:
                time.sleep(0.005)
            time.sleep(float(rng.uniform(0.0, chunk_s)))
        p.kill()
        _, err = p.communicate(timeout=120)
        if p.returncode == 0:
            landed["after_finish"] += 1
            break
        assert p.returncode == -signal.SIGKILL, err
        landed["mid_run" if progress(out) > done else "during_start"] += 1
        if record is not None:
            landed["stages"].append(record(out))
    p = start(out, *args)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    return landed


def leftovers(d: Path):
    return sorted(p.name for p in d.iterdir() if ".tmp" in p.name or p.name.endswith(".lock"))


def test_sigterm_then_sigkills_and_resume(tmp_path):
    """The default variant (one reference run for both): SIGTERM once the run is in its loop (it finishes
    the chunk, exits 143, says how to resume), then SIGKILLs at 3 random moments, then the rest."""
    args = ("--cells", "2", "--steps", "3000")
    ref, *timing = reference(tmp_path, *args)
    out = tmp_path / "run.h5"
    p = launch(out, *args)
    deadline = time.time() + 300
    while not state_path(out).exists():  # the first chunk is on disk: the run is in its loop
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err and "stopped after step" in err
    info = trajectory.read_info(out)
    assert info["complete"] is False and 0 < info["steps_done"] < 3000
    assert leftovers(tmp_path) == []
    landed = kill_and_resume(out, 3, timing, 0, *args)
    assert landed["during_start"] + landed["mid_run"] + landed["after_finish"] >= 1
    same_file(ref, out)
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_sigkill_twenty_times(tmp_path):
    """The figure in BENCHMARKS.md (Reliability): 20 kills of one run, each at a random moment."""
    args = ("--cells", "3", "--steps", "20000")  # 200 chunks: 20 kills do not reach its end
    ref, *timing = reference(tmp_path, *args)
    out = tmp_path / "run.h5"
    landed = kill_and_resume(out, 20, timing, 1, *args)
    print("kills:", landed)
    assert landed["mid_run"] >= 10 and landed["after_finish"] == 0
    same_file(ref, out)
    assert leftovers(tmp_path) == []


TRAIN = Path(__file__).with_name("fault_train.py")


def launch_train(work, out, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(TRAIN), str(work), str(out), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def train_steps_done(out) -> int:
    """The step of the run's newest complete `last` checkpoint (0 before the first)."""
    from jaxbench import runs

    try:
        return int(runs.find_checkpoint(out, ("last", "last.prev"), warn=False)[1]["step"])
    except Exception:  # noqa: BLE001 - not there yet
        return 0


@pytest.mark.slow
def test_train_sigterm_then_killed_twenty_times(tmp_path):
    """`train` (a checkpoint after every step, 2 data-parallel devices): SIGTERM once in its loop (it finishes
    the step, checkpoints, exits 143), then SIGKILLed at 20 random moments and resumed each time: the final
    parameters, EMA weights, optimiser state and best checkpoint equal an uninterrupted run's bit for bit."""
    from jaxbench import runs

    from .test_train import flat

    work, args = tmp_path / "work", ("--epochs", "12")  # 72 steps
    t0 = time.perf_counter()
    p = launch_train(work, tmp_path / "warm", "--epochs", "1")  # generates the data once (not part of the timing)
    assert p.wait(timeout=900) == 0, p.stderr.read()
    t0 = time.perf_counter()
    p = launch_train(work, tmp_path / "ref", *args)
    while train_steps_done(tmp_path / "ref") < 1 and p.poll() is None:
        time.sleep(0.01)
    first = time.perf_counter() - t0
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    step_s = (time.perf_counter() - t0 - first) / 71
    out = tmp_path / "run"
    p = launch_train(work, out, *args)
    while train_steps_done(out) < 2:
        assert p.poll() is None
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err and "stopped after step" in err
    landed = kill_and_resume(out, 20, (first, step_s), 3, *args, start=lambda o, *a: launch_train(work, o, *a),
                             progress=train_steps_done)
    print("train kills:", landed)
    assert landed["mid_run"] >= 10 and landed["after_finish"] == 0
    for which in ("last", "best"):
        a = runs.load_checkpoint(runs.checkpoint_dir(tmp_path / "ref", which))
        b = runs.load_checkpoint(runs.checkpoint_dir(out, which))
        for k in ("params", "ema_params", "opt_state"):
            np.testing.assert_array_equal(flat(a[k]), flat(b[k]), err_msg=f"{which} {k}")
    ra = runs.check_checkpoint(runs.checkpoint_dir(tmp_path / "ref", "last"))
    rb = runs.check_checkpoint(runs.checkpoint_dir(out, "last"))
    assert {k: ra[k] for k in ("step", "epoch", "best_epoch", "best_metric")} == {
        k: rb[k] for k in ("step", "epoch", "best_epoch", "best_metric")}
    assert leftovers(out) == [] and leftovers(out / "checkpoints") == []


BENCH = Path(__file__).with_name("fault_bench.py")
TIMING_KEYS = ("time", "seconds", "_s", "started", "finished", "speed", "wall", "elapsed", "rss", "reused", "_min",
               "run_dir", "trajectory")


def without_timings(x):
    """results.json without wall-clock figures and paths (what differs between two correct runs)."""
    if isinstance(x, dict):
        return {k: without_timings(v) for k, v in x.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(x, list):
        return [without_timings(v) for v in x]
    return x


BENCH_STAGES = (("training", "training"), ("accuracy", "evaluation"), ("simulation", "simulation"),
                ("scored", "scoring"), ("finished", "report"))


def bench_stage(out) -> str:
    """The stage of bench in progress: the one after the last that results.json holds ('done' after all)."""
    import json

    res = out / "results.json"
    done = json.loads(res.read_text()) if res.exists() else {}
    for key, stage in BENCH_STAGES:
        if key not in done:
            return stage
    return "done"


def bench_progress(out) -> int:
    """Units of work a bench directory has committed: training steps, rollout chunks, finished stages."""
    import json

    try:
        done = json.loads((out / "results.json").read_text())
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        done = {}
    return (train_steps_done(out / "train") + chunks_done(out / "reference.h5") + chunks_done(out / "trajectory.h5")
            + sum(key in done for key, _ in BENCH_STAGES))


@pytest.mark.slow
def test_bench_killed_twenty_times_gives_the_same_results(tmp_path):
    """`bench` (train for 2 epochs with a checkpoint after each step, evaluate, oracle and model rollouts,
    scoring) SIGKILLed at 20 random moments, re-run each time: results.json equals an uninterrupted run's
    apart from timings, and the kills landed in several stages."""
    import json
    import shutil

    work = tmp_path / "work"

    def start(out):
        return subprocess.Popen([sys.executable, str(BENCH), str(work), str(out)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    p = start("--data-only")
    assert p.wait(timeout=900) == 0, p.stderr.read()
    t0 = time.perf_counter()
    _, err = (p := start(tmp_path / "ref")).communicate(timeout=900)
    assert p.returncode == 0, err
    seconds = time.perf_counter() - t0
    # a re-run of a finished benchmark is its start-up alone (imports, compilation, checking what is done)
    shutil.copytree(tmp_path / "ref", tmp_path / "again")
    t0 = time.perf_counter()
    _, err = (p := start(tmp_path / "again")).communicate(timeout=900)
    assert p.returncode == 0, err
    start_s = time.perf_counter() - t0
    units = bench_progress(tmp_path / "ref")
    unit_s = min(1.0, (seconds - start_s) / units)
    # every fourth kill at a random moment of the start-up, the others up to a second after the next unit of
    # work is committed (the units' times vary from 0.2 s for a step to 10 s for scoring): 15 such kills do
    # not reach the end of 20 training steps, 12 rollout chunks and 5 stages
    landed = kill_and_resume(tmp_path / "run", 20, (start_s, unit_s), 2, start=lambda o: start(o),
                             progress=bench_progress, next_units=1, record=bench_stage)
    print(f"bench ({seconds:.0f} s, re-run {start_s:.0f} s, {units} units) kills:", landed)
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    got = json.loads((tmp_path / "run" / "results.json").read_text())
    assert without_timings(got) == without_timings(ref)
    assert landed["after_finish"] == 0 and landed["during_start"] + landed["mid_run"] == 20, landed
    assert {"training", "simulation"} <= set(landed["stages"]), landed  # not all in start-up or in one stage
    assert leftovers(tmp_path / "run") == [] and leftovers(tmp_path / "run" / "train") == []
