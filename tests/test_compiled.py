"""jaxbench.compiled: the caches of compiled programs stay under the kernel's memory-mapping limit."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest

from jaxbench import compiled

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux only")


@linux
def test_map_count_and_limit_read_from_proc():
    n, limit = compiled.map_count(), compiled.map_limit()
    assert n is not None and n > 10
    assert limit is not None and limit > n


@linux
def test_check_clears_registered_caches_past_the_fraction(monkeypatch):
    cache = {}
    monkeypatch.setattr(compiled, "_CLEARERS", [cache.clear])
    monkeypatch.setattr(compiled, "_warned", False)
    for i in range(20):  # programs kept alive by a cache, as md / train / evaluate keep theirs
        f = jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cos(x @ x.T).sum())
        f(jnp.ones((4, 4))).block_until_ready()
        cache[i] = f
    held = compiled.map_count()

    # under the fraction: nothing happens
    monkeypatch.setattr(compiled, "map_limit", lambda: 10 * held)
    assert compiled.check(0.5) is False and len(cache) == 20

    # past it: the caches are cleared, the mappings released, the user told once
    monkeypatch.setattr(compiled, "map_limit", lambda: held)
    with pytest.warns(RuntimeWarning, match="max_map_count"):
        assert compiled.check(0.5) is True
    assert cache == {}
    assert compiled.map_count() < held - 20  # each compiled program held several mappings
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled.check(0.0) is True  # cleared again, silently
        monkeypatch.setattr(compiled, "_warned", False)
        cache["again"] = object()
        assert compiled.check(0.0, warn=False) is True and cache == {}  # the tests' own bound: no warning


def test_the_project_caches_are_registered():
    from jaxbench import evaluate, metrics
    from jaxbench.md import engine as md_engine
    from jaxbench.train import step as train_step

    md_engine._CACHE["probe"] = object()
    train_step._FN_CACHE["probe"] = object()
    evaluate._PREDICT_CACHE["probe"] = object()
    metrics._pair_counts_fn(1, 2, (False, False, False), (0, 0), 1, None, 3.0, 4, 0.75, "float64")
    assert metrics._pair_counts_fn.cache_info().currsize >= 1
    compiled.clear()
    assert "probe" not in md_engine._CACHE and "probe" not in train_step._FN_CACHE and "probe" not in evaluate._PREDICT_CACHE
    assert metrics._pair_counts_fn.cache_info().currsize == 0


def test_simulate_train_and_evaluate_check_before_they_compile(monkeypatch, tmp_path):
    """Each entry point that compiles asks first (here it raises, so nothing else runs)."""
    from jaxbench import evaluate, md, train
    from jaxbench.md import driver as md_driver

    class Asked(Exception):
        pass

    def ask(*a, **k):
        raise Asked

    monkeypatch.setattr(compiled, "check", ask)
    monkeypatch.setattr(md_driver, "check_compiled", ask)
    with pytest.raises(Asked):
        md.simulate(None, None, None)
    with pytest.raises(Asked):
        train.train(model="nequip-small", dataset="md17-ethanol", out=tmp_path / "r")
    with pytest.raises(Asked):
        evaluate.evaluate(tmp_path / "missing-run")
