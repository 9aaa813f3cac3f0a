"""Shared test setup.

Real reference data come from a mirror of the upstream release: env `JAXBENCH_DATA_MIRROR` (CI sets
it), else `../shared/data/egraffbench` beside the repository. Tests fetch from it into a temporary
data directory through the project's own `jaxbench.data.fetch`, exactly as a user would.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

import jaxbench

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
