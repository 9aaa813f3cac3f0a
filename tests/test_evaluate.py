"""Evaluation: metric values against a hand computation, results.json and parity plots of a run."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxbench import runs
from jaxbench.evaluate import EV_A3_TO_GPA, compute_metrics, evaluate
from jaxbench.frames import Frames

from .conftest import requires_data
from .test_train import tiny_card


def test_metrics_match_hand_computation():
    rng = np.random.default_rng(0)
    F, N = 4, 3
    pos = rng.uniform(0, 4, (F, N, 3)) + np.arange(N)[None, :, None] * 2.0
    e = rng.normal(size=F)
    f = rng.normal(size=(F, N, 3))
    s = rng.normal(size=(F, 3, 3)) * 0.01
    s[1] = np.nan  # frame 1 has no stress label
    frames = Frames.from_arrays(pos, [1, 6, 8], cell=np.eye(3) * 10, pbc=[True] * 3, energy=e, forces=f, stress=s)
    pe = e + np.array([0.01, -0.02, 0.03, 0.0])
    pf = f.reshape(-1, 3) + rng.normal(size=(F * N, 3)) * 0.05
    ps = np.nan_to_num(s) + rng.normal(size=(F, 3, 3)) * 0.001
    m = compute_metrics(frames, dict(energy=pe, forces=pf, stress=ps))
    # by hand
    assert m["energy_mae_meV"] == pytest.approx(1000 * (0.01 + 0.02 + 0.03 + 0.0) / 4)
    assert m["energy_rmse_meV"] == pytest.approx(1000 * np.sqrt((0.01**2 + 0.02**2 + 0.03**2) / 4))
    assert m["energy_mae_meV_atom"] == pytest.approx(1000 * (0.01 + 0.02 + 0.03) / 4 / 3)
    d = (pf - f.reshape(-1, 3)).ravel()
    assert m["forces_mae_meV_A"] == pytest.approx(1000 * sum(abs(x) for x in d) / d.size)
    assert m["forces_rmse_meV_A"] == pytest.approx(1000 * np.sqrt(sum(x * x for x in d) / d.size))
    ds = np.concatenate([(ps[i] - s[i]).ravel() for i in (0, 2, 3)])
    assert m["n_frames_stress"] == 3
    assert m["stress_mae_meV_A3"] == pytest.approx(1000 * np.abs(ds).mean())
    assert m["stress_mae_GPa"] == pytest.approx(EV_A3_TO_GPA * np.abs(ds).mean())
    # no stress labels at all: no stress metrics
    m2 = compute_metrics(frames.replace(stress=None), dict(energy=pe, forces=pf, stress=None))
    assert "stress_mae_meV_A3" not in m2


@requires_data
def test_evaluate_run_uses_ema_params_and_writes_results(tmp_path):
    from jaxbench import data
    from jaxbench.graph import build_graphs
    from jaxbench.potential import Potential
    from jaxbench.stats import compute_statistics

    card = tiny_card()
    train = data.load("md17-ethanol", "train")[np.arange(4)]
    stats = compute_statistics(train, 5.0)
    pot = Potential.from_card(card, stats)
    test = data.load("md17-ethanol", "test")[np.arange(4)]
    fg = build_graphs(test, 5.0)
    g_all = fg.batch(np.arange(4))
    # parameters of the right shapes without compiling `init`: random values
    from jaxbench.graph import edge_vectors

    shapes = jax.eval_shape(pot.module.init, jax.random.PRNGKey(0), edge_vectors(g_all, pad_length=10.0),
                            pot.species_index(g_all.species), g_all.senders, g_all.receivers, g_all.edge_mask, g_all.node_mask)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    ema = jax.tree.map(lambda x: x * 1.05, params)
    run = tmp_path / "run"
    run.mkdir()
    runs.write_json(run / "card.json", card)
    runs.write_json(run / "statistics.json", stats.to_json())
    runs.write_json(run / "dataset.json", dict(name="md17-ethanol", splits=dict(train="train", val="val"), seed=0))
    runs.save_checkpoint(run, "best", dict(params=params, ema_params=ema, opt_state=()), dict(step=7, epoch=1, ema=True))

    res = evaluate(run, split="test", n_frames=4, batch_size=2)
    # independent predictions: one batch of all four frames with the EMA parameters
    out = jax.device_get(jax.jit(pot.__call__)(ema, g_all.replace(positions=np.asarray(g_all.positions, np.float32))))
    de = out["energy"][:4] - test.energy
    df = out["forces"][: 4 * 9] - test.forces
    m = res["metrics"]
    assert m["n_frames"] == 4 and m["n_atoms"] == 36
    assert m["energy_mae_meV"] == pytest.approx(1000 * np.abs(de).mean(), rel=1e-4)
    assert m["energy_rmse_meV_atom"] == pytest.approx(1000 * np.sqrt(np.mean((de / 9) ** 2)), rel=1e-4)
    assert m["forces_mae_meV_A"] == pytest.approx(1000 * np.abs(df).mean(), rel=1e-4)
    assert m["forces_rmse_meV_A"] == pytest.approx(1000 * np.sqrt(np.mean(df**2)), rel=1e-4)
    saved = json.loads((run / "results-md17-ethanol-test.json").read_text())
    assert saved["metrics"] == m and saved["checkpoint"] == "best" and saved["step"] == 7
    assert json.loads((run / "results.json").read_text())["metrics"] == m
    png = run / "parity-md17-ethanol-test.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the CLI prints the same metrics
    from jaxbench.cli import main

    assert main(["evaluate", str(run), "--split", "test", "--n-frames", "4", "--batch-size", "2", "--no-plots"]) == 0


def test_evaluate_missing_run_is_named(tmp_path):
    with pytest.raises(runs.CheckpointError, match="does not exist"):
        evaluate(tmp_path / "nope")
