"""Training and evaluation of every model card's `-small` variant, from Python and from the command line.

Datasets: md17-ethanol (molecule), lips (periodic, no stress labels) and lips20-P2S5 (a LiPS20 material
with stress labels; the stress / virial loss is switched on and the stress MAE must be reported).
New cards are picked up from `model_cards()` (like tests/test_models.py).

Default suite (kept under ~90 s of CPU, see DEFAULT_PAIRS): two card / dataset pairs covering both
dataset kinds: train() + evaluate() in Python (float64) and `jaxbench train` + `jaxbench evaluate` through the CLI's
`main` in-process, both in float64 and on the same frames, so that the CLI run reuses the Python run's
compiled step and prediction functions (compilation is most of the cost). The full card x dataset
matrix, and the CLI as real `python -m jaxbench` subprocesses in float32 (the CLI default), are `-m slow`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxbench import runs
from jaxbench.potential import model_cards

from .conftest import REPO, requires_data

SMALL_CARDS = sorted(n for n, c in model_cards().items() if c.get("variant_of") and n.endswith("-small"))
DATASETS = ("md17-ethanol", "lips", "lips20-P2S5")
STRESS_DATASET = "lips20-P2S5"
N_VAL = 2

pytestmark = [requires_data, pytest.mark.skipif(not SMALL_CARDS, reason="no model cards yet")]


def n_train(card_name: str) -> int:
    """At least 4 frames, and at least one batch of the card's batch size (a smaller split is refused)."""
    return max(4, int(model_cards()[card_name]["training"].get("batch_size", 1)))


def stress_training(card_name: str, dataset: str) -> dict | None:
    """Cards whose loss has no stress / virial term get a stress weight on the stress dataset, so that
    the stress loss is active for every card there."""
    if dataset != STRESS_DATASET:
        return None
    weights = dict(model_cards()[card_name]["training"].get("loss_weights", {}))
    if weights.get("stress", 0) > 0 or weights.get("virials", 0) > 0:
        return None
    return {"loss_weights": dict(weights, stress=1.0)}


def check_run(run, card_name: str, dataset: str, steps: int):
    """What a one-epoch run must have written and logged."""
    for f in ("card.json", "statistics.json", "dataset.json", "config.json", "log.jsonl"):
        assert (run / f).is_file(), f
    meta = runs.check_checkpoint(runs.checkpoint_dir(run, "last"))
    assert meta["step"] == steps and meta["epoch"] == 1
    epochs = [r for r in runs.read_log(run) if r.get("event") == "epoch"]
    assert len(epochs) == 1
    tr, val = epochs[0]["train"], epochs[0]["val"]
    assert math.isfinite(tr["loss"]) and math.isfinite(val["forces_mae_meV_A"]) and val["forces_mae_meV_A"] > 0
    if dataset == STRESS_DATASET:
        # the stress (or virial) term is part of the loss and was computed on the labelled frames
        assert json.loads((run / "config.json").read_text())["compute_stress"] is True
        assert any(k in tr and tr[k] > 0 for k in ("stress", "virials")), tr
    else:
        assert "stress" not in tr


def check_results(res: dict, dataset: str, split: str, n_frames: int):
    m = res["metrics"]
    assert res["dataset"] == dataset and res["split"] == split and m["n_frames"] == n_frames
    for k in ("energy_mae_meV", "energy_rmse_meV", "energy_mae_meV_atom", "forces_mae_meV_A", "forces_rmse_meV_A"):
        assert math.isfinite(m[k]) and m[k] > 0, k
    if dataset == STRESS_DATASET:
        assert m["n_frames_stress"] == n_frames and math.isfinite(m["stress_mae_GPa"]) and m["stress_mae_GPa"] > 0
    else:
        assert "stress_mae_GPa" not in m


def python_train_and_evaluate(card_name: str, dataset: str, tmp_path):
    from jaxbench.evaluate import evaluate
    from jaxbench.train import train

    n = n_train(card_name)
    bs = int(model_cards()[card_name]["training"].get("batch_size", 1))
    run = tmp_path / "py"
    summary = train(model=card_name, dataset=dataset, max_epochs=1, budget=None, out=run, n_train=n, n_val=N_VAL,
                    training=stress_training(card_name, dataset), dtype="float64", progress=False)
    steps = math.ceil(n / bs)
    assert summary["stop_reason"] == "max_epochs" and summary["step"] == steps
    check_run(run, card_name, dataset, steps)
    res = evaluate(run, split="test", n_frames=2)
    check_results(res, dataset, "test", 2)
    assert (run / "results.json").is_file() and (run / f"parity-{dataset}-test.png").stat().st_size > 1000
    return steps


def cli_args(card_name: str, dataset: str, run, tmp_path, dtype: str = "float64") -> list[str]:
    model = card_name
    extra = stress_training(card_name, dataset)
    if extra:  # the CLI takes overrides through a card file
        card = model_cards()[card_name]
        card = dict(card, training=dict(card["training"], **extra))
        card.pop("_path", None)
        path = tmp_path / f"{card_name}-stress.json"
        path.write_text(json.dumps(card))
        model = str(path)
    return ["train", "--model", model, "--dtype", dtype, "--dataset", dataset, "--max-epochs", "1", "--budget", "20m",
            "--n-train", str(n_train(card_name)), "--n-val", str(N_VAL), "--seed", "0", "--out", str(run), "--quiet"]


def cli_train_and_evaluate_in_process(card_name: str, dataset: str, tmp_path, steps: int, capsys):
    from jaxbench.cli import main

    run = tmp_path / "cli"
    assert main(cli_args(card_name, dataset, run, tmp_path)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == steps and summary["stop_reason"] == "max_epochs"
    check_run(run, card_name, dataset, steps)
    assert main(["evaluate", str(run), "--split", "test", "--n-frames", "2"]) == 0
    out = capsys.readouterr().out
    assert "forces_mae_meV_A" in out and str(run / f"results-{dataset}-test.json") in out
    res = json.loads((run / f"results-{dataset}-test.json").read_text())
    check_results(res, dataset, "test", 2)
    # same seed, frames and dtype as the Python run: the same trained weights and errors
    py = json.loads((tmp_path / "py" / "results.json").read_text())["metrics"]
    assert res["metrics"]["forces_mae_meV_A"] == pytest.approx(py["forces_mae_meV_A"], rel=1e-9)


# The default suite keeps to ~90 s of CPU: compiling each card's training step, validation and prediction
# costs ~15-45 s a card on this 2-core machine (nequip-small with stress ~100 s), so it holds two
# cheap pairs that cover both dataset kinds (molecule; periodic with stress and the virial loss). Every card x dataset pair, including each new card, runs with `-m slow`.
DEFAULT_PAIRS = [p for p in (("mace-small", "lips20-P2S5"), ("allegro-small", "md17-ethanol"))
                 if p[0] in SMALL_CARDS]
ALL_PAIRS = [(c, d) for c in SMALL_CARDS for d in DATASETS]


@pytest.mark.parametrize("card_name, dataset", DEFAULT_PAIRS)
def test_train_and_evaluate_small_card(card_name, dataset, tmp_path, capsys):
    steps = python_train_and_evaluate(card_name, dataset, tmp_path)
    cli_train_and_evaluate_in_process(card_name, dataset, tmp_path, steps, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("card_name, dataset", [p for p in ALL_PAIRS if p not in DEFAULT_PAIRS])
def test_train_and_evaluate_small_card_matrix(card_name, dataset, tmp_path, capsys):
    steps = python_train_and_evaluate(card_name, dataset, tmp_path)
    cli_train_and_evaluate_in_process(card_name, dataset, tmp_path, steps, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("card_name, dataset", ALL_PAIRS)
def test_command_line_subprocess(card_name, dataset, tmp_path):
    """The real command line: `python -m jaxbench train ...` then `python -m jaxbench evaluate ...`."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = tmp_path / "sub"
    t = subprocess.run([sys.executable, "-m", "jaxbench"] + cli_args(card_name, dataset, run, tmp_path, "float32"), env=env,
                       capture_output=True, text=True, timeout=900)
    assert t.returncode == 0, t.stderr[-3000:]
    bs = int(model_cards()[card_name]["training"].get("batch_size", 1))
    check_run(run, card_name, dataset, math.ceil(n_train(card_name) / bs))
    assert json.loads((run / "config.json").read_text())["dtype"] == "float32"
    e = subprocess.run([sys.executable, "-m", "jaxbench", "evaluate", str(run), "--n-frames", "2"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert e.returncode == 0, e.stderr[-3000:]
    check_results(json.loads((run / "results.json").read_text()), dataset, "test", 2)
    assert np.isfinite(json.loads((run / "results.json").read_text())["metrics"]["forces_mae_meV_A"])
