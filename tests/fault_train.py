"""A small training run for tests/test_faults.py to kill: ``python tests/fault_train.py WORKDIR OUT [--epochs N]``.

nequip-small cut to 2 layers and l_max 1 on the quickstart's Lennard-Jones argon (generated once into
WORKDIR), 2 data-parallel CPU devices, a fixed number of epochs (no wall-clock budget, so an interrupted
run has one right answer) and a checkpoint after every step. A call resumes what the previous one left in
OUT (from step 0 when it had no checkpoint yet)."""

from __future__ import annotations

from pathlib import Path


def main(argv):
    import jax

    import jaxbench

    jax.config.update("jax_enable_x64", True)
    jaxbench.use_cpu_devices(2)
    from jaxbench import cards, quickstart
    from jaxbench.potential import model_card
    from jaxbench.train import train

    work, out = Path(argv[0]), Path(argv[1])
    epochs = int(argv[argv.index("--epochs") + 1]) if "--epochs" in argv else 3
    if not (work / "cards" / "data" / f"{quickstart.DATASET}.yaml").is_file():
        quickstart.generate_dataset(work, n_cells=2, equilibration_steps=500, progress=False)
    cards.add_path(work / "cards")
    card = model_card("nequip-small")
    card.pop("_path", None)
    card["name"] = "nequip-tiny"
    card["hyperparameters"].update(num_layers=2, l_max=1, r_max=quickstart.LJ["cutoff"])
    card["training"].update(batch_size=2, valid_batch_size=4)
    resume = (out / "config.json").is_file()  # killed before its run files were written: a new run
    res = train(card, quickstart.DATASET, budget=None, max_epochs=epochs, seed=3, out=out, resume=resume, n_train=12,
                n_val=4, checkpoint_every=1, progress=False)
    print("done", res["step"], res["stop_reason"], flush=True)
    return 0


if __name__ == "__main__":
    from fault_sim import run_cli  # beside this script (its folder is on sys.path)

    run_cli(main)
