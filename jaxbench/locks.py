"""Advisory locks on what a run writes (run directories, bench directories, trajectories).

A module with no package imports beyond the errors, so the simulator, the trainer and `runs` can all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

from .errors import JaxbenchError


class RunLockedError(JaxbenchError):
    """Another live process writes this run directory or trajectory."""


LOCK_NAME = ".jaxbench.lock"
_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth


def lock_path(path: str | os.PathLike, file: bool = False) -> Path:
    """The lock file of a run directory (``DIR/.jaxbench.lock``) or of an output file (``FILE.lock``)."""
    path = Path(path)
    return path.with_name(path.name + ".lock") if file else path / LOCK_NAME


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _lock_owner(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def locked(path: str | os.PathLike, what: str = "run directory", file: bool = False):
    """Hold the advisory lock of `path` (a run directory, or an output file with ``file=True``) while writing it.

    The lock is a file created with O_EXCL holding the owner's pid, host, start time and command. A second
    writer gets :class:`RunLockedError` naming the owner. A lock left by a process that died (same host, pid
    gone: SIGKILL, power loss) is stale and taken over, with a warning; one from another host cannot be
    checked and is reported with the file to delete once that process is known to be gone. Re-entrant
    within one process (bench -> train of its own run directory locks nothing twice)."""
    import socket
    import sys
    import time

    path = Path(path)
    lock = lock_path(path, file)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only file system, a file where a directory should be, no permission
        raise JaxbenchError(f"cannot write the {what} {path}: {e}") from e
    key = str(lock.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield lock
        finally:
            _HELD[key] -= 1
        return
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "command": " ".join(sys.argv[:6])}
    for attempt in range(50):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None:  # being written right now, or a crash mid-write: stale only once it is old
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < 5.0:
                    time.sleep(0.1)
                    continue
                owner = {"pid": None, "host": host}
            if owner.get("host") == host and (owner.get("pid") is None or not _pid_alive(owner["pid"])):
                aside = lock.with_name(f"{lock.name}.stale-{owner.get('pid')}-{os.getpid()}")
                try:
                    os.replace(lock, aside)  # one taker wins the rename; the others retry and find a live owner
                except FileNotFoundError:
                    continue
                warnings.warn(f"{what} {path}: took over the stale lock of pid {owner.get('pid')} (no such process "
                              f"on {host}; it was started {owner.get('started', '?')})", RuntimeWarning, stacklevel=3)
                aside.unlink(missing_ok=True)
                continue
            where = "this host" if owner.get("host") == host else f"host {owner.get('host')}"
            hint = ("" if owner.get("host") == host else
                    f"; if that process is gone, delete {lock}")
            raise RunLockedError(f"{what} {path} is being written by pid {owner.get('pid')} on {where} since "
                                 f"{owner.get('started', '?')} ({owner.get('command', '?')}){hint}") from None
        except OSError as e:
            raise JaxbenchError(f"cannot write the {what} {path} (its lock {lock.name}): {e}") from e
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            break
    else:
        raise RunLockedError(f"{what} {path}: could not take the lock {lock}")
    _HELD[key] = 1
    try:
        yield lock
    finally:
        del _HELD[key]
        if (_lock_owner(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
