"""Training: card validation, bad input before compute, run directories, resume, NaN, SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxbench import runs
from jaxbench.errors import DataError, UnknownNameError
from jaxbench.potential import model_card, model_cards
from jaxbench.train import ConfigError, TrainingConfig, TrainingDivergedError, parse_duration, train

from .conftest import REPO, requires_data


def tiny_card(**training):
    """nequip-small cut down further (2 layers, l_max 1): compiles fast; every training code path."""
    card = model_card("nequip-small")
    card["name"] = "nequip-tiny"
    card["hyperparameters"].update(num_layers=2, l_max=1)
    card["training"].update(dict(dict(batch_size=2, valid_batch_size=2), **training))
    card.pop("_path", None)
    return card


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


# ---------------------------------------------------------------------------------------------
# Card validation (no data, no compute)
# ---------------------------------------------------------------------------------------------
def test_parse_duration():
    assert parse_duration("60m") == 3600
    assert parse_duration("1.5h") == 5400
    assert parse_duration("90s") == 90
    assert parse_duration("5 days") == 5 * 86400
    assert parse_duration(12) == 12
    assert parse_duration(None) is None
    with pytest.raises(ConfigError):
        parse_duration("ten minutes")
    with pytest.raises(ConfigError):
        parse_duration("-5m")


def test_every_card_training_block_is_valid():
    cards = model_cards()
    assert {"nequip", "mace"} <= set(cards)
    for name, card in cards.items():
        if "training" in card:
            cfg = TrainingConfig.from_card(card)
            assert cfg.learning_rate > 0 and any(v > 0 for v in cfg.weights.values()), name
    mace = TrainingConfig.from_card(cards["mace"])
    assert mace.optimizer == "amsgrad" and mace.energy_per_atom and mace.ema and mace.swa is not None
    assert mace.swa["weights"]["energy"] == 1000.0 and mace.clip_grad == 10.0
    nequip = TrainingConfig.from_card(cards["nequip"])
    assert not nequip.energy_per_atom and nequip.ema and nequip.scheduler["name"] == "reduce_on_plateau"
    assert nequip.patience == 50 and nequip.min_lr == 1e-6 and nequip.max_wall == 5 * 86400


@pytest.mark.parametrize(
    "override, words",
    [
        ({"optimizer": "sgdx"}, ["optimizer", "sgdx", "amsgrad"]),
        ({"learning_rate": -0.01}, ["learning_rate", "> 0"]),
        ({"loss_weights": {"energy": 0, "forces": 0}}, ["loss_weights", "zero"]),
        ({"loss_weights": {"energy": 1, "dipole": 1}}, ["dipole"]),
        ({"scheduler": {"name": "step_lr"}}, ["scheduler", "step_lr"]),
        ({"batch_size": 0}, ["batch_size"]),
        ({"ema_decay": 1.5}, ["ema_decay"]),
    ],
)
def test_invalid_card_values_fail_before_compute(override, words, tmp_path):
    with pytest.raises(ConfigError) as e:
        train(model=tiny_card(), dataset="md17-ethanol", training=override, out=tmp_path / "r", max_epochs=1)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "r").exists()  # nothing was written


def test_unknown_card_and_dataset_suggest_names(tmp_path):
    with pytest.raises(UnknownNameError) as e:
        train(model="nequip-smal", dataset="md17-ethanol", out=tmp_path / "r")
    assert "nequip-small" in str(e.value)
    with pytest.raises(UnknownNameError) as e:
        train(model="nequip-small", dataset="md17-ethanl", out=tmp_path / "r")
    assert "md17-ethanol" in str(e.value)
    assert not (tmp_path / "r").exists()


def test_cli_bad_input_exits_with_a_named_error(capsys, tmp_path):
    from jaxbench.cli import main

    assert main(["train", "--model", "nequip-smal", "--dataset", "md17-ethanol", "--out", str(tmp_path / "r")]) == 2
    assert "Did you mean: nequip-small" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tiny_card(optimizer="lbfgs")))
    assert main(["train", "--model", str(bad), "--dataset", "md17-ethanol", "--out", str(tmp_path / "r")]) == 2
    assert "unknown optimizer 'lbfgs'" in capsys.readouterr().err


@requires_data
def test_split_smaller_than_batch_size(tmp_path):
    with pytest.raises(DataError, match="fewer than the batch size 5"):
        train(model="mace-small", dataset="md17-ethanol", n_train=3, n_val=2, out=tmp_path / "r", max_epochs=1)


@requires_data
def test_species_the_model_cannot_represent(tmp_path):
    from jaxbench.stats import DatasetStatistics

    stats = DatasetStatistics(species=(1, 6), atomic_energies={1: -13.6, 6: -1029.0}, energy_per_atom_mean=0.0,
                              energy_per_atom_std=1.0, force_rms=1.0, avg_num_neighbors=8.0, cutoff=5.0, n_frames=1)
    with pytest.raises(DataError, match="cannot represent O"):
        train(model=tiny_card(), dataset="md17-ethanol", n_train=4, n_val=2, statistics=stats, out=tmp_path / "r",
              max_epochs=1)


# ---------------------------------------------------------------------------------------------
# Checkpoints (no compute)
# ---------------------------------------------------------------------------------------------
def _state(v):
    return {"params": {"params": {"w": np.full(3, v, np.float32)}}, "opt_state": (np.int32(v),)}


def test_checkpoint_atomic_fallback_and_never_overwrite(tmp_path):
    for v in (1, 2):
        runs.save_checkpoint(tmp_path, "last", _state(v), {"step": v})
    assert runs.check_checkpoint(tmp_path / "checkpoints/last")["step"] == 2
    assert runs.check_checkpoint(tmp_path / "checkpoints/last.prev")["step"] == 1
    # a leftover temporary directory from a killed write is ignored
    (tmp_path / "checkpoints/.last.tmp-999").mkdir()
    # corrupt the newest: it is named, and the previous one is used
    with open(tmp_path / "checkpoints/last/state.msgpack", "r+b") as f:
        f.seek(10)
        f.write(b"\x00\xff\x00")
    with pytest.warns(UserWarning, match=r"checkpoints/last: state.msgpack is corrupt"):
        path, meta = runs.find_checkpoint(tmp_path)
    assert path.name == "last.prev" and meta["step"] == 1
    assert runs.load_checkpoint(path, target=_state(0))["params"]["params"]["w"][0] == 1
    # the next save moves the corrupt one aside and keeps the good one
    runs.save_checkpoint(tmp_path, "last", _state(3), {"step": 3})
    assert runs.check_checkpoint(tmp_path / "checkpoints/last")["step"] == 3
    assert runs.check_checkpoint(tmp_path / "checkpoints/last.prev")["step"] == 1
    assert (tmp_path / "checkpoints/last.corrupt-0").is_dir()
    # a partial checkpoint (no meta.json: the write never completed) is named too
    (tmp_path / "checkpoints/last/meta.json").unlink()
    with pytest.warns(UserWarning, match="partial"):
        path, meta = runs.find_checkpoint(tmp_path)
    assert meta["step"] == 1
    # killed between the two renames of a save: no `last`, the complete `last.prev` is used, and the
    # next save cleans the stale temporary directory and does not touch `last.prev`
    import shutil

    shutil.rmtree(tmp_path / "checkpoints/last")
    path, meta = runs.find_checkpoint(tmp_path)
    assert path.name == "last.prev" and meta["step"] == 1
    runs.save_checkpoint(tmp_path, "last", _state(4), {"step": 4})
    assert runs.check_checkpoint(tmp_path / "checkpoints/last.prev")["step"] == 1
    assert not list((tmp_path / "checkpoints").glob(".last.tmp-*"))
    with pytest.raises(runs.CheckpointError, match="no usable checkpoint"):
        runs.find_checkpoint(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# Real training (tiny model, a few frames of md17-ethanol)
# ---------------------------------------------------------------------------------------------
KW = dict(dataset="md17-ethanol", n_train=4, n_val=2, seed=3, progress=False, checkpoint_every=1)


@requires_data
def test_train_resume_exact_and_load_potential(tmp_path, monkeypatch):
    card = tiny_card()
    t0 = time.perf_counter()
    full = train(model=card, max_epochs=3, out=tmp_path / "full", budget=None, **KW)
    t_full = time.perf_counter() - t0
    assert full["step"] == 6 and full["epoch"] == 3 and full["stop_reason"] == "max_epochs"
    run = tmp_path / "full"
    for f in ("card.json", "statistics.json", "dataset.json", "config.json", "log.jsonl"):
        assert (run / f).is_file(), f
    ds = json.loads((run / "dataset.json").read_text())
    assert ds == dict(ds, name="md17-ethanol", seed=3, n_train=4, n_val=2)
    epochs = [r for r in runs.read_log(run) if r.get("event") == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    for r in epochs:
        assert {"loss", "energy", "forces"} <= set(r["train"])
        assert {"energy_mae_meV", "forces_mae_meV_A", "loss"} <= set(r["val"])
        assert r["lr"] == 0.005 and r["elapsed_s"] > 0

    # 1) stop after one epoch, resume to three: identical parameters
    part = train(model=card, max_epochs=1, out=tmp_path / "part", budget=None, **KW)
    assert part["step"] == 2
    res = train(out=tmp_path / "part", resume=True, max_epochs=3, budget=None, progress=False)
    assert res["step"] == 6
    a = runs.load_checkpoint(runs.checkpoint_dir(run, "last"))
    b = runs.load_checkpoint(runs.checkpoint_dir(tmp_path / "part", "last"))
    np.testing.assert_array_equal(flat(a["params"]), flat(b["params"]))
    np.testing.assert_array_equal(flat(a["ema_params"]), flat(b["ema_params"]))
    np.testing.assert_array_equal(flat(a["opt_state"]), flat(b["opt_state"]))

    # 2) a budget that runs out after the first step (mid-epoch), then resume: identical again
    mid = train(model=card, max_epochs=3, out=tmp_path / "mid", budget=1e-3, **KW)
    assert mid["stop_reason"] == "budget" and mid["step"] == 1 and mid["batch_in_epoch"] == 1
    res = train(out=tmp_path / "mid", resume=True, budget="1h", progress=False)
    assert res["step"] == 6 and res["stop_reason"] == "max_epochs"
    c = runs.load_checkpoint(runs.checkpoint_dir(tmp_path / "mid", "last"))
    np.testing.assert_array_equal(flat(a["params"]), flat(c["params"]))
    assert [r["event"] for r in runs.read_log(tmp_path / "mid")].count("resume") == 1

    # 3) SIGTERM / SIGINT (the deferred check, as the signal handler reports it): the step in flight finishes,
    # `last` is written, Interrupted says how to resume. Safe points, in order: the top of epoch 0, after step 1
    # (mid-epoch), the top of epoch 1 (2 steps per epoch), after step 3: the signal arrives before the 4th
    # (stop mid-epoch at step 3) or the 3rd (stop at the end of epoch 0, step 2)
    import contextlib

    from jaxbench import interrupts
    from jaxbench.errors import Interrupted

    # (each train() call compiles its step again, so only the mid-epoch case runs by default; the same code
    # stopped at the 3rd safe point, the end of epoch 0, passed on 2026-12-07: nth 3 -> step 2, batch 0)
    for name, nth, stops_at, batch in (("term-mid", 4, 3, 1),):
        d = tmp_path / name

        @contextlib.contextmanager
        def signal_after(active=True, nth=nth):
            calls = []

            def got():
                calls.append(1)
                return signal.SIGTERM if len(calls) >= nth else None
            yield got

        monkeypatch.setattr(interrupts, "deferred", signal_after)
        with pytest.raises(Interrupted) as e:
            train(model=card, max_epochs=3, out=d, budget=None, **KW)
        assert e.value.exit_code == 143 and "--resume" in str(e.value)
        meta = runs.check_checkpoint(runs.checkpoint_dir(d, "last"))
        assert (meta["step"], meta["batch_in_epoch"]) == (stops_at, batch), name
        assert [r for r in runs.read_log(d) if r["event"] == "interrupted"][0]["step"] == stops_at
        monkeypatch.undo()
        assert train(out=d, resume=True, budget=None, progress=False)["step"] == 6
        t = runs.load_checkpoint(runs.checkpoint_dir(d, "last"))
        for k in ("params", "ema_params", "opt_state"):
            np.testing.assert_array_equal(flat(a[k]), flat(t[k]))

    # resumed before any checkpoint was written (killed during its setup): the same run from step 0
    fresh = tmp_path / "fresh"  # the run files of `full` without its checkpoints (no second compile to make them)
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns("checkpoints", "log.jsonl"))
    (fresh / "checkpoints").mkdir()
    (fresh / "checkpoints" / ".last.tmp-999999").mkdir()  # a writer killed mid-write left this
    assert train(out=fresh, resume=True, budget=None, progress=False)["step"] == 6
    assert not list((fresh / "checkpoints").glob(".*tmp*"))
    np.testing.assert_array_equal(flat(a["params"]), flat(runs.load_checkpoint(runs.checkpoint_dir(fresh, "last"))["params"]))

    # load_potential: EMA parameters of the best checkpoint, usable as they are
    from jaxbench import data
    from jaxbench.graph import build_graphs

    pot, params = runs.load_potential(run)
    best_path, best_meta = runs.find_checkpoint(run, ("best",))
    np.testing.assert_array_equal(flat(params), flat(runs.load_checkpoint(best_path)["ema_params"]))
    assert pot.name == "nequip-tiny"
    frames = data.load("md17-ethanol", "val")[np.arange(2)]
    out = pot(params, build_graphs(frames, pot.r_max).batch([0, 1]))
    assert np.all(np.isfinite(np.asarray(out["forces"])))
    # resuming a run that already exists without --resume is refused
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(model=card, max_epochs=3, out=run, **KW)
    print(f"tiny train, 6 steps incl. compile: {t_full:.1f} s")


@requires_data
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    card = tiny_card()
    with pytest.raises(TrainingDivergedError) as e:
        train(model=card, max_epochs=3, out=tmp_path / "r", budget=None, training={"learning_rate": 1e30}, **KW)
    step = e.value.step
    assert step is not None and f"step {step}" in str(e.value)
    path, meta = runs.find_checkpoint(tmp_path / "r", ("last",))
    assert meta["step"] == step - 1  # the checkpoint before the NaN step is there and complete
    assert any(r.get("event") == "nan" and r["step"] == step for r in runs.read_log(tmp_path / "r"))


# ---------------------------------------------------------------------------------------------
# SIGKILL a real `python -m jaxbench train` process mid-epoch, then --resume
# ---------------------------------------------------------------------------------------------
@requires_data
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    card_file = tmp_path / "tiny.json"
    card_file.write_text(json.dumps(tiny_card()))
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jaxcache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "jaxbench", "train", "--model", str(card_file), "--dataset", "md17-ethanol",
            "--n-train", "8", "--n-val", "2", "--max-epochs", "2", "--seed", "1", "--checkpoint-every", "3", "--quiet"]
    # the uninterrupted reference run
    ref = subprocess.run(base + ["--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # the same run, SIGKILLed while it sits right after the in-epoch checkpoint at step 3 (of 4 per epoch)
    killed = tmp_path / "killed"
    p = subprocess.Popen(base + ["--out", str(killed), "--pause-after-checkpoint", "600"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    meta_path = killed / "checkpoints" / "last" / "meta.json"
    t0 = time.time()
    while not meta_path.exists():
        assert p.poll() is None, p.stderr.read().decode()[-3000:]
        assert time.time() - t0 < 900
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    meta = json.loads(meta_path.read_text())
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (3, 0, 3)  # mid-epoch
    assert not any(r.get("event") == "epoch" for r in runs.read_log(killed))  # killed before the epoch ended
    res = subprocess.run(base[:4] + ["--out", str(killed), "--resume", "--quiet"], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    log = runs.read_log(killed)
    resume = [r for r in log if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 3 and resume[0]["batch_in_epoch"] == 3
    assert [r["epoch"] for r in log if r.get("event") == "epoch"] == [0, 1]
    a = runs.load_checkpoint(runs.checkpoint_dir(tmp_path / "ref", "last"))
    b = runs.load_checkpoint(runs.checkpoint_dir(killed, "last"))
    assert runs.check_checkpoint(runs.checkpoint_dir(killed, "last"))["step"] == 8
    for k in ("params", "ema_params", "opt_state"):
        np.testing.assert_array_equal(flat(a[k]), flat(b[k]))
    # the logged epoch metrics agree too (the resumed epoch 0 kept its first 3 steps' losses)
    ra = [r for r in runs.read_log(tmp_path / "ref") if r.get("event") == "epoch"]
    rb = [r for r in log if r.get("event") == "epoch"]
    for x, y in zip(ra, rb):
        assert x["train"] == pytest.approx(y["train"], rel=1e-12) and x["val"] == pytest.approx(y["val"], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Weight decay restricted to parameter paths (mace-torch parameter groups)
# ---------------------------------------------------------------------------------------------
def _small_params(card_name):
    """Parameters of a small card built on a 3-atom H2O-like frame (no dataset needed)."""
    from jaxbench.frames import Frames
    from jaxbench.graph import build_graphs
    from jaxbench.potential import Potential
    from jaxbench.stats import DatasetStatistics

    card = model_card(card_name)
    stats = DatasetStatistics(species=(1, 6, 8), atomic_energies={1: -13.6, 6: -1029.0, 8: -2042.0},
                              energy_per_atom_mean=0.0, energy_per_atom_std=1.0, force_rms=1.0,
                              avg_num_neighbors=2.0, cutoff=5.0, n_frames=1)
    pot = Potential.from_card(card, stats)
    frames = Frames.from_arrays(np.array([[[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]]), [8, 1, 6])
    params = pot.init(jax.random.PRNGKey(0), build_graphs(frames, pot.r_max).batch([0]))
    return card, params


# By hand from mace-torch 0.3 get_params_options: interactions' `linear.weight` and every product
# parameter decay; node embedding, linear_up, radial MLP (conv_tp_weights), skip_tp and readouts do not.
MACE_SMALL_DECAYED = {
    "interaction_0/linear_0e", "interaction_0/linear_1o", "interaction_0/linear_2e",
    "interaction_1/linear_0e", "interaction_1/linear_1o", "interaction_1/linear_2e",
    "product_0/linear/w[0,0] 8x0e,8x0e", "product_0/linear/w[1,1] 8x1o,8x1o",
    "product_0/symmetric_contraction/w1_0e", "product_0/symmetric_contraction/w1_1o",
    "product_0/symmetric_contraction/w2_0e", "product_0/symmetric_contraction/w2_1o",
    "product_1/linear/w[0,0] 8x0e,8x0e", "product_1/symmetric_contraction/w1_0e",
    "product_1/symmetric_contraction/w2_0e",
}
BOTNET_SMALL_DECAYED = {"interaction_0/linear_0e", "interaction_0/linear_1o",
                        "interaction_1/linear_0e", "interaction_1/linear_1o"}


@pytest.mark.parametrize("card_name, expected", [("mace-small", MACE_SMALL_DECAYED), ("botnet-small", BOTNET_SMALL_DECAYED)])
def test_weight_decay_mask_selects_mace_torch_groups_and_decays_only_them(card_name, expected):
    from jaxbench.train import make_optimizer, parameter_path, weight_decay_mask

    card, params = _small_params(card_name)
    cfg = TrainingConfig.from_card(card)
    assert cfg.weight_decay == 5e-7 and cfg.weight_decay_on is not None
    mask = weight_decay_mask(params, cfg.weight_decay_on)
    flat_mask = {parameter_path(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert {k for k, m in flat_mask.items() if m} == expected
    assert any(k.startswith("node_embedding") for k in flat_mask) and any(k.startswith("readout_") for k in flat_mask)
    # One optimizer update with zero loss gradient: only the decayed leaves move (L2 term wd * p feeds AMSGrad)
    cfg = dataclasses.replace(cfg, clip_grad=None)
    tx = make_optimizer(cfg)
    zeros = jax.tree.map(np.zeros_like, params)
    direction, _ = tx.update(zeros, tx.init(params), params)
    for (path, d), (_, p) in zip(jax.tree_util.tree_flatten_with_path(direction)[0], jax.tree_util.tree_flatten_with_path(params)[0]):
        name = parameter_path(path)
        if name in expected:
            # AMSGrad's first step is ~sign(g) = sign(p) wherever p is not tiny
            big = np.abs(np.asarray(p)) > 1e-3
            assert big.any() and np.all(np.sign(np.asarray(d))[big] == np.sign(np.asarray(p))[big]), name
        else:
            assert not np.any(np.asarray(d)), name
    # without weight_decay_on every leaf decays (the previous behaviour, and torch's single param group)
    all_tx = make_optimizer(dataclasses.replace(cfg, weight_decay_on=None))
    d_all, _ = all_tx.update(zeros, all_tx.init(params), params)
    assert all(np.any(np.asarray(d)) for d in jax.tree.leaves(d_all))


def test_weight_decay_pattern_that_matches_nothing_is_named():
    from jaxbench.train import weight_decay_mask

    _, params = _small_params("mace-small")
    with pytest.raises(ConfigError, match=r"'interactoin_\*/linear_\*' matches no parameter"):
        weight_decay_mask(params, ("product_*", "interactoin_*/linear_*"))
    with pytest.raises(ConfigError, match="weight_decay_on"):
        TrainingConfig.from_card(dict(model_card("mace-small"), training=dict(
            model_card("mace-small")["training"], weight_decay_on=[3])))


# ---------------------------------------------------------------------------------------------
# SWA: equal-weight average of the weights after every second-phase epoch
# ---------------------------------------------------------------------------------------------
@requires_data
def test_swa_average_by_hand_resume_exact_and_used_for_validation(tmp_path):
    from jaxbench.evaluate import evaluate

    # 4 epochs of 2 steps, second phase from epoch 1: the average holds the weights after epochs 1, 2, 3
    card = tiny_card(swa=dict(enabled=True, learning_rate=0.002, loss_weights={"energy": 10.0, "forces": 1.0},
                              start_epoch_fraction=0.25, use_average=True))
    kw = dict(KW, checkpoint_every=None)
    staged = tmp_path / "staged"
    after = {}
    for epochs in (1, 2, 3, 4):
        if epochs == 1:
            train(model=card, max_epochs=1, out=staged, budget=None, **kw)
        else:
            train(out=staged, resume=True, max_epochs=epochs, budget=None, progress=False)
        after[epochs - 1] = runs.load_checkpoint(runs.checkpoint_dir(staged, "last"))
    meta = runs.check_checkpoint(runs.checkpoint_dir(staged, "last"))
    assert meta["swa_count"] == 3 and meta["swa_average"] and meta["phase"] == 2
    by_hand = (flat(after[1]["params"]) + flat(after[2]["params"]) + flat(after[3]["params"])) / 3
    np.testing.assert_allclose(flat(after[3]["swa_params"]), by_hand, rtol=1e-6, atol=1e-7)
    # the first member is copied exactly (torch AveragedModel), not mixed with the placeholder
    np.testing.assert_array_equal(flat(after[1]["swa_params"]), flat(after[1]["params"]))
    assert not np.array_equal(flat(after[3]["swa_params"]), flat(after[3]["params"]))
    # an uninterrupted run ends bit-identical (average included)
    full = tmp_path / "full"
    train(model=card, max_epochs=4, out=full, budget=None, **kw)
    a = runs.load_checkpoint(runs.checkpoint_dir(full, "last"))
    for k in ("params", "ema_params", "swa_params", "opt_state"):
        np.testing.assert_array_equal(flat(a[k]), flat(after[3][k]))
    # validation, `last` and evaluate use the average: evaluating it on the same frames reproduces the
    # logged validation force MAE of the last epoch
    pot, params = runs.load_potential(full, "last")
    np.testing.assert_array_equal(flat(params), flat(a["swa_params"]))
    last_val = [r for r in runs.read_log(full) if r.get("event") == "epoch"][-1]["val"]
    res = evaluate(full, dataset="md17-ethanol", split="val", which="last", n_frames=2, plots=False)
    assert res["swa_average"] is True
    assert res["metrics"]["forces_mae_meV_A"] == pytest.approx(last_val["forces_mae_meV_A"], rel=1e-4)
    # with use_average false (mace-torch) the average is kept but the EMA weights are used
    card_off = tiny_card(swa=dict(card["training"]["swa"], use_average=False))
    off = tmp_path / "off"
    train(model=card_off, max_epochs=4, out=off, budget=None, **kw)
    b = runs.load_checkpoint(runs.checkpoint_dir(off, "last"))
    np.testing.assert_array_equal(flat(b["swa_params"]), flat(a["swa_params"]))
    _, params_off = runs.load_potential(off, "last")
    np.testing.assert_array_equal(flat(params_off), flat(b["ema_params"]))


@pytest.mark.slow
@requires_data
def test_plateau_schedule_warmup_scales_the_first_steps(tmp_path):
    """TorchMD-Net's lr warm-up (``warmup_steps`` of reduce_on_plateau): lr x (step + 1) / warmup_steps.
    Adam's first update is lr x sign(gradient), so one step with warm-up 4 vs none from the same start
    differs by exactly 0.75 lr on every parameter with a gradient."""
    lr = 0.005
    kw = dict(KW, n_train=2, checkpoint_every=None)
    sched = dict(name="reduce_on_plateau", factor=0.8, patience=5)
    got = {}
    for warm in (0, 4):
        card = tiny_card(learning_rate=lr, scheduler=dict(sched, warmup_steps=warm), weight_decay=0.0)
        out = tmp_path / f"w{warm}"
        train(model=card, max_epochs=1, out=out, budget=None, **kw)
        got[warm] = flat(runs.load_checkpoint(runs.checkpoint_dir(out, "last"))["params"])
        log = [r for r in runs.read_log(out) if r.get("event") == "epoch"]
        assert log[-1]["lr"] == pytest.approx(lr * (2 / warm if warm else 1.0))  # lr at step 1 (the next one)
    d = np.abs(got[0] - got[4]) / lr
    moved = d[d > 0.1]
    assert len(moved) > 0.5 * len(d)
    np.testing.assert_allclose(np.median(moved), 0.75, rtol=1e-3)


@requires_data
def test_data_parallel_training_equals_one_device(tmp_path):
    """Batches of 3 split over the two test devices (2 + 1 frames; the short last batch of 2: 1 + 1) give
    the same updates as one device: the gradient of each part is normalised by the whole batch's counts."""
    assert len(jax.local_devices()) == 2
    card = tiny_card(batch_size=3)
    kw = dict(KW, n_train=5, checkpoint_every=None, dtype="float64")
    from .conftest import CompileCounter

    one = train(model=card, max_epochs=2, out=tmp_path / "one", budget=None, devices=1, **kw)
    with CompileCounter() as compiles:
        two = train(model=card, max_epochs=2, out=tmp_path / "two", budget=None, **kw)
    # one program for every step: the short last batch is padded like a full one, and the first step's
    # state (on one device) is put on the mesh where the later steps' state is
    assert compiles["train_step"] == 1, compiles.counts
    assert one["step"] == two["step"] == 4
    assert json.loads((tmp_path / "two" / "config.json").read_text())["devices"] == 2
    assert json.loads((tmp_path / "one" / "config.json").read_text())["devices"] == 1
    a = runs.load_checkpoint(runs.checkpoint_dir(tmp_path / "one", "last"))
    b = runs.load_checkpoint(runs.checkpoint_dir(tmp_path / "two", "last"))
    np.testing.assert_allclose(flat(b["params"]), flat(a["params"]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(flat(b["opt_state"]), flat(a["opt_state"]), rtol=1e-9, atol=1e-12)
    la = [r for r in runs.read_log(tmp_path / "one") if r.get("event") == "epoch"]
    lb = [r for r in runs.read_log(tmp_path / "two") if r.get("event") == "epoch"]
    for ra, rb in zip(la, lb):
        assert ra["train"]["loss"] == pytest.approx(rb["train"]["loss"], rel=1e-9)
        assert ra["val"]["forces_mae_meV_A"] == pytest.approx(rb["val"]["forces_mae_meV_A"], rel=1e-9)
    with pytest.raises(ConfigError, match="devices"):
        train(model=card, max_epochs=1, out=tmp_path / "three", budget=None, devices=3, **kw)


@pytest.mark.slow
@requires_data
def test_second_phase_at_the_budget_fraction_or_only_at_the_epoch(tmp_path):
    """With a budget the second phase starts at the card's fraction of it (default) or, with
    swa_on_budget=False, only at its fraction of max_epochs (here epoch 1 of 1: never). The same card and
    budget both times: only the flag differs."""
    card = tiny_card(swa=dict(enabled=True, learning_rate=0.002, loss_weights={"energy": 10.0, "forces": 1.0},
                              start_epoch_fraction=1e-9))  # of the 1 h budget: at once
    kw = dict(KW, checkpoint_every=None)
    by_budget = train(model=card, max_epochs=1, out=tmp_path / "b", budget="1h", **kw)
    assert by_budget["phase"] == 2 and by_budget["stop_reason"] == "max_epochs"
    by_epoch = train(model=card, max_epochs=1, out=tmp_path / "e", budget="1h", swa_on_budget=False, **kw)
    assert by_epoch["phase"] == 1 and by_epoch["stop_reason"] == "max_epochs"
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["swa_on_budget"] is False and config["swa_start_s"] is None and config["swa_start_epoch"] == 1
    # the command line's --swa-start epochs is the same choice
    from jaxbench.cli import main

    card_file = tmp_path / "swa.json"
    card_file.write_text(json.dumps(card))
    args = ["train", "--model", str(card_file), "--dataset", "md17-ethanol", "--n-train", "4", "--n-val", "2",
            "--seed", "3", "--max-epochs", "1", "--budget", "1h", "--dtype", "float64", "--quiet"]
    for flag, phase in (("budget", 2), ("epochs", 1)):
        assert main(args + ["--out", str(tmp_path / f"cli-{flag}"), "--swa-start", flag]) == 0
        config = json.loads((tmp_path / f"cli-{flag}" / "config.json").read_text())
        assert config["swa_on_budget"] is (flag == "budget")
        phases = [r["phase"] for r in runs.read_log(tmp_path / f"cli-{flag}") if r.get("event") == "epoch"]
        assert phases == [phase]
