"""Shared test setup.

Real reference data come from a mirror of the upstream release: env `JAXBENCH_DATA_MIRROR` (CI sets
it), else `../shared/data/egraffbench` beside the repository. Tests fetch from it into a temporary
data directory through the project's own `jaxbench.data.fetch`, exactly as a user would.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# One persistent XLA compilation cache for the whole test session: the xdist workers and every subprocess
# the tests start (fault injection, CLI, notebook) inherit it from the environment, so a program compiled
# once (the same chunk in a killed and a resumed run, the same training step in two `train()` calls,
# anything recompiled after the map-count clearing below) is loaded instead of compiled again. Fresh per
# session and removed at its end: nothing carries over between CI runs. Set before JAX is imported, which
# reads these variables then; JAXBENCH_TEST_COMPILATION_CACHE=0 turns it off, a user's own
# JAX_COMPILATION_CACHE_DIR is respected.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and os.environ.get("JAXBENCH_TEST_COMPILATION_CACHE", "1") != "0":
    _cache = tempfile.mkdtemp(prefix="jaxbench-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    atexit.register(shutil.rmtree, _cache, True)

import jax  # noqa: E402
import pytest  # noqa: E402

import jaxbench  # noqa: E402

# glibc writes its fatal messages (heap corruption, failed asserts) to the terminal, not to stderr, unless
# this is set: a worker that aborts inside native code then says why in the CI log.
os.environ.setdefault("LIBC_FATAL_STDERR_", "1")

# Tests check physics to 1e-6 and beyond: float64 everywhere unless a test asks for float32.
jax.config.update("jax_enable_x64", True)
# Two CPU devices, as the CLI sets up on a 2-core machine: simulations with several replicas go through
# the device-sharded layout by default (tests compare it with devices=1).
jaxbench.use_cpu_devices(2)

REPO = Path(__file__).resolve().parents[1]


def mirror_path() -> Path | None:
    env = os.environ.get("JAXBENCH_DATA_MIRROR")
    if env:
        return Path(env)
    p = REPO.parent / "shared" / "data" / "egraffbench"
    return p if p.is_dir() else None


MIRROR = mirror_path()
requires_data = pytest.mark.skipif(MIRROR is None, reason="no data mirror: set JAXBENCH_DATA_MIRROR")


@pytest.fixture(scope="session", autouse=True)
def _isolated_data_dir(tmp_path_factory):
    """Every test session gets its own data directory; nothing touches the user's cache."""
    d = tmp_path_factory.mktemp("jaxbench-data")
    old = {k: os.environ.get(k) for k in ("JAXBENCH_DATA_DIR", "JAXBENCH_DATA_MIRROR")}
    os.environ["JAXBENCH_DATA_DIR"] = str(d)
    if MIRROR is not None:
        os.environ["JAXBENCH_DATA_MIRROR"] = str(MIRROR)
    yield d
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _bounded_compiled_programs():
    """A worker runs hundreds of tests, each compiling programs that the project's and JAX's caches keep;
    XLA:CPU maps their code in many small mappings and the kernel caps a process at vm.max_map_count
    (65530): past it the next compile segfaults (two CI runs died so). Clear the caches between tests
    well before the limit (the library's own `jaxbench.compiled.check()` would do it at half, with a
    warning)."""
    yield
    from jaxbench import compiled

    compiled.check(0.3, warn=False)


@pytest.fixture(scope="session")
def data_root(_isolated_data_dir):
    if MIRROR is None:
        pytest.skip("no data mirror: set JAXBENCH_DATA_MIRROR")
    return _isolated_data_dir


class CompileCounter:
    """Counts XLA compilations of jitted functions by name while active (JAX's own compile log, which
    reports each compilation, also those the persistent cache then serves): ``with CompileCounter() as c:
    ...; c["train_step"]``."""

    def __init__(self):
        import collections
        import logging

        self.counts = collections.Counter()
        counter = self

        class Handler(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if msg.startswith("Compiling ") and " with global shapes" in msg:
                    counter.counts[msg[len("Compiling "):].split(" with global shapes")[0]] += 1

        self.handler = Handler()

    def __enter__(self):
        import logging

        self.log_compiles = jax.log_compiles(True)
        self.log_compiles.__enter__()
        logging.getLogger("jax").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("jax").removeHandler(self.handler)
        self.log_compiles.__exit__(*exc)

    def __getitem__(self, name: str) -> int:
        return self.counts[f"jit({name})"]
