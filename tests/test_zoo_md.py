"""Every model card simulates: `jaxbench simulate` on md17-ethanol and LiPS with a trained run of each
`*-small` card (model zoo I and II). Slow (one compile per model and system); `-m slow` runs them.

The models are trained for one step only, so the trajectories are not physical; still, each is a smooth
energy, so a short NVE run at a small timestep must conserve its total energy: the test asserts that the
run completes with finite numbers, writes a readable trajectory, and that the total energy fluctuates far
less than the kinetic energy it exchanges with (a replica that breaks a bond is a result, not an error).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxbench.potential import model_cards

from .conftest import requires_data

SMALL_CARDS = sorted(n for n, c in model_cards().items() if c.get("variant_of") and n.endswith("-small"))

pytestmark = [requires_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from jaxbench.train import train

    runs = {}

    def get(card, dataset):
        key = (card, dataset)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"{card}-{dataset}")
            train(card, dataset, out=out, max_epochs=1, budget=None, n_train=2, n_val=1, progress=False,
                  training={"batch_size": 1, "valid_batch_size": 1})
            runs[key] = out
        return runs[key]

    return get


@pytest.mark.parametrize("dataset", ["md17-ethanol", "lips"])
@pytest.mark.parametrize("card", SMALL_CARDS)
def test_every_small_card_simulates(card, dataset, trained, tmp_path, capsys):
    from jaxbench import trajectory
    from jaxbench.cli import main

    run = trained(card, dataset)
    out = tmp_path / "md"
    rc = main(["simulate", str(run), "--dataset", dataset, "--replicas", "2", "--steps", "60", "--out", str(out),
               "--ensemble", "nve", "--timestep", "0.1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    files = list(out.glob("*.h5"))
    assert files, list(out.iterdir())
    tr = trajectory.read(files[0])
    assert tr["position"].shape[0] == 2 and tr["position"].shape[1] >= 1
    assert np.all(np.isfinite(tr["potential_energy"][:, 0]))
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    assert summary.get("steps_done", 20) > 0
    # NVE: float32 network, float64 integration; conservation relative to the kinetic energy's swings
    ok = ~np.asarray(summary.get("failed", [False, False]), bool)
    for r in np.flatnonzero(ok):
        e_tot, ke = tr["conserved_energy"][r], tr["kinetic_energy"][r]
        assert np.all(np.isfinite(e_tot))
        assert np.std(e_tot) < 0.05 * np.std(ke) + 1e-6, (card, dataset, r, np.std(e_tot), np.std(ke))
