"""simulate(..., resume=True): a run stopped after any chunk continues bit for bit.

A crash is a callback that raises after chunk k (the state and the frames of chunk k are on disk, as
they are when the process is killed there); tests/test_faults.py kills real processes."""

from __future__ import annotations

import numpy as np
import pytest

from jaxbench import md, trajectory
from jaxbench.errors import JaxbenchError
from jaxbench.md.resume import ResumeError, load, state_path

from .test_md import LJ, argon, proto


class Crash(RuntimeError):
    pass


def crash_after(chunk):
    def cb(info):
        if info["chunk"] == chunk:
            raise Crash(chunk)
    return cb


def same_file(a, b):
    ta, tb = trajectory.read(a), trajectory.read(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if isinstance(ta[k], dict):
            for kk in ta[k]:
                np.testing.assert_array_equal(ta[k][kk], tb[k][kk], err_msg=f"{k}/{kk}")
        else:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    ia, ib = trajectory.read_info(a), trajectory.read_info(b)
    for k in ("frames_committed", "steps_done", "failed", "failure_step", "failure_reason", "complete"):
        np.testing.assert_array_equal(ia[k], ib[k], err_msg=k)


def failing_start():
    """Replica 1 has two atoms 1.6 Å apart: it fails in its first steps, replica 0 goes on."""
    st = argon(2, replicas=2)
    pos = st.positions.copy()
    pos[1, 1] = pos[1, 0] + [1.6, 0.0, 0.0]
    return md.Start.make(pos, st.numbers, st.cell, True)


@pytest.mark.parametrize("ensemble, devices", [("nvt_langevin", 2), pytest.param("nvt_nose_hoover", 1, marks=pytest.mark.slow)])
def test_resume_after_a_crash_is_bit_identical(tmp_path, ensemble, devices):
    """Langevin (the RNG key is state) over 2 devices, Nosé–Hoover (the chain is state) on one, a failed
    replica in both; crashed after the second of four chunks and resumed."""
    st = failing_start()
    p = proto(ensemble=ensemble, steps=200, chunk_steps=50, save_every=10, friction_per_fs=0.01)
    full = md.simulate(LJ, st, p, seed=4, out=tmp_path / "full.h5", progress=False, devices=devices)
    assert list(full.failed) == [False, True]
    cut = tmp_path / "cut.h5"
    with pytest.raises(Crash):
        md.simulate(LJ, st, p, seed=4, out=cut, progress=False, devices=devices, callback=crash_after(1))
    assert trajectory.read_info(cut)["complete"] is False and state_path(cut).exists()
    with pytest.raises(JaxbenchError, match="resume=True"):
        md.simulate(LJ, st, p, seed=4, out=cut, progress=False)  # exists: refused without resume
    res = md.simulate(LJ, st, p, seed=4, out=cut, progress=False, resume=True, keep_arrays=True)
    assert res.timings["resumed_at_step"] == 100 and res.steps_done == 200
    np.testing.assert_array_equal(res.failure_step, full.failure_step)
    same_file(full.path, cut)
    assert res.arrays["position"].shape == trajectory.read(cut)["position"].shape
    # a finished run resumes to itself without computing a chunk
    again = md.simulate(LJ, st, p, seed=4, out=cut, progress=False, resume=True)
    assert again.timings["first_chunk_s"] == 0.0 and again.steps_done == 200
    same_file(full.path, cut)


def test_resume_rewinds_frames_written_after_the_state(tmp_path):
    """A kill between the chunk's frames and its state: the file is ahead of the state; resume cuts it back."""
    st = argon(2)
    p = proto(ensemble="nvt_langevin", steps=150, chunk_steps=50, friction_per_fs=0.01)
    full = md.simulate(LJ, st, p, seed=1, out=tmp_path / "full.h5", progress=False)
    cut = tmp_path / "cut.h5"
    with pytest.raises(Crash):
        md.simulate(LJ, st, p, seed=1, out=cut, progress=False, callback=crash_after(0))
    state = state_path(cut).read_bytes()
    with pytest.raises(Crash):
        md.simulate(LJ, st, p, seed=1, out=cut, progress=False, resume=True, callback=crash_after(1))
    state_path(cut).write_bytes(state)  # the state of chunk 0, the frames of chunk 1
    # and a state write that a SIGKILL cut short (its writer's pid in the name)
    stale = state_path(cut).with_name(state_path(cut).name + ".tmp999999")
    stale.write_bytes(state[:100])
    assert trajectory.read_info(cut)["frames_committed"] == 11
    md.simulate(LJ, st, p, seed=1, out=cut, progress=False, resume=True)
    same_file(full.path, cut)
    assert not stale.exists()


def test_resume_refuses_another_run_and_names_what_differs(tmp_path):
    st = argon(2)
    p = proto(ensemble="nvt_langevin", steps=100, chunk_steps=50, friction_per_fs=0.01)
    cut = tmp_path / "cut.h5"
    with pytest.raises(Crash):
        md.simulate(LJ, st, p, seed=1, out=cut, progress=False, callback=crash_after(0))
    with pytest.raises(ResumeError, match="seed was 1, this run's is 2"):
        md.simulate(LJ, st, p, seed=2, out=cut, progress=False, resume=True)
    with pytest.raises(ResumeError, match="temperature_K"):
        md.simulate(LJ, st, p.replace(temperature_K=150.0), seed=1, out=cut, progress=False, resume=True)
    with pytest.raises(ResumeError, match="cutoff was 7.0"):
        md.simulate(md.lennard_jones(cutoff=6.0), st, p, seed=1, out=cut, progress=False, resume=True)
    with pytest.raises(ResumeError, match="params_sha256"):  # other weights
        md.simulate(md.lennard_jones(epsilon=0.011, cutoff=7.0), st, p, seed=1, out=cut, progress=False, resume=True)
    # resume + overwrite: a run that does not match starts again (and leaves no stale state behind)
    res = md.simulate(LJ, st, p, seed=2, out=cut, progress=False, resume=True, overwrite=True)
    assert "resumed_at_step" not in res.timings and res.steps_done == 100
    fresh = md.simulate(LJ, st, p, seed=2, out=tmp_path / "fresh.h5", progress=False)
    same_file(fresh.path, cut)
    # a broken state file is named
    state_path(cut).write_bytes(b"not a state")
    with pytest.raises(ResumeError, match="unreadable"):
        md.simulate(LJ, st, p, seed=2, out=cut, progress=False, resume=True)
    # nothing there yet: resume starts a fresh run
    new = md.simulate(LJ, st, p, seed=2, out=tmp_path / "new.h5", progress=False, resume=True)
    assert new.steps_done == 100
    same_file(fresh.path, new.path)


def test_resume_after_a_neighbour_list_reallocation(tmp_path):
    """The list overflowed and was re-allocated before the crash: the resumed run re-allocates the same way
    (same capacity, same compiled chunk) and stays bit-identical."""
    st = argon(2)
    lj = md.lennard_jones(cutoff=6.5)
    p = proto(ensemble="nve", temperature_K=200.0, steps=200, chunk_steps=50, capacity_multiplier=1.0)
    full = md.simulate(lj, st, p, seed=2, out=tmp_path / "full.h5", progress=False)
    assert full.n_reallocations >= 1
    cut = tmp_path / "cut.h5"
    with pytest.raises(Crash):
        md.simulate(lj, st, p, seed=2, out=cut, progress=False, callback=crash_after(2))
    assert load(state_path(cut)).n_reallocations >= 1  # the crash came after a re-allocation
    res = md.simulate(lj, st, p, seed=2, out=cut, progress=False, resume=True)
    assert res.capacity == full.capacity and res.n_reallocations == full.n_reallocations
    same_file(full.path, cut)


def test_disk_full_is_named_and_the_last_chunk_is_the_resume_point(tmp_path, monkeypatch):
    """ENOSPC while the third chunk's state is written: a named error, no temporary file, the first two
    chunks intact; once there is space again the run resumes to the uninterrupted trajectory."""
    import errno

    from jaxbench.md import resume as rs

    st = argon(2)
    p = proto(ensemble="nvt_langevin", steps=200, chunk_steps=50, friction_per_fs=0.01)
    full = md.simulate(LJ, st, p, seed=5, out=tmp_path / "full.h5", progress=False)
    real, calls = np.savez, []

    def savez(f, **kw):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, **kw)

    monkeypatch.setattr(rs.np, "savez", savez)
    cut = tmp_path / "cut.h5"
    with pytest.raises(JaxbenchError, match=r"writing chunk 2 .*No space left.*chunks before it are intact"):
        md.simulate(LJ, st, p, seed=5, out=cut, progress=False)
    monkeypatch.setattr(rs.np, "savez", real)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cut.h5", "cut.h5.state.npz", "full.h5", "full.h5.state.npz"]
    assert load(state_path(cut)).steps_done == 100
    md.simulate(LJ, st, p, seed=5, out=cut, progress=False, resume=True)
    same_file(full.path, cut)


def test_unwritable_output_is_named(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(JaxbenchError, match="cannot write the trajectory .*a_file"):
        md.simulate(LJ, argon(1), proto(steps=20, chunk_steps=20), out=tmp_path / "a_file" / "t.h5", progress=False)
