"""SIGTERM / SIGINT deferred to a safe point: a long run (a simulation chunk, a training step) finishes the
unit of work in flight, commits it, and only then stops with :class:`jaxbench.errors.Interrupted`."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def deferred(active: bool = True):
    """Note SIGTERM / SIGINT instead of acting on them; yields a function returning the first signal's number
    (or None). A second signal gets the default behaviour at once (a user who presses Ctrl-C twice means it).
    Outside the main thread (signals cannot be caught there) or with ``active`` false, nothing is caught."""
    import signal
    import threading

    if not active or threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)

    def handler(signum, frame):
        if got:
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
            signal.raise_signal(signum)
            return
        got.append(signum)

    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield lambda: got[0] if got else None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
