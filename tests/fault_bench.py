"""A small benchmark for tests/test_faults.py to kill: ``python tests/fault_bench.py WORKDIR OUT``.

The quickstart's Lennard-Jones argon (data generated once into WORKDIR), mace-small trained for a fixed
number of epochs (not a wall-clock budget, so an interrupted run has one right answer) with a checkpoint after
every step (so that kills can land between steps), 2 replicas x 300 steps in chunks of 50
steps with the Lennard-Jones oracle. Every call continues what the previous ones left in OUT.
``python tests/fault_bench.py WORKDIR --data-only`` only generates the data (so that the timed reference run
that kill moments are drawn from does not include it)."""

from __future__ import annotations

from pathlib import Path


def main(argv):
    import jax

    import jaxbench

    jax.config.update("jax_enable_x64", True)
    jaxbench.use_cpu_devices(2)
    from jaxbench import cards, quickstart
    from jaxbench.bench import bench

    work, out = Path(argv[0]), Path(argv[1])
    if not (work / "cards" / "data" / f"{quickstart.DATASET}.yaml").is_file():
        quickstart.generate_dataset(work, n_cells=2, equilibration_steps=500, progress=False)
    if argv[1] == "--data-only":
        return 0
    cards.add_path(work / "cards")
    bench(quickstart.model_card(), quickstart.DATASET, out, train_budget=None, max_epochs=2, n_train=40, n_val=10,
          protocol=quickstart.protocol().replace(chunk_steps=50), steps=300, replicas=2, oracle=quickstart.oracle(), progress=False,
          plots=False, train_kw=dict(checkpoint_every=1))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    from fault_sim import run_cli  # beside this script (its folder is on sys.path)

    run_cli(main)
