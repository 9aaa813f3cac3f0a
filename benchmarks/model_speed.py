"""Energy + forces time of model cards on one test frame per system (float64, random weights).

Prints wall and process CPU milliseconds per jitted `jax.value_and_grad` call (after warm-up), with the
number of edges. `--single-thread` pins XLA to one thread (set before JAX starts), so that CPU time is
comparable across runs on a machine that is not idle; compare two versions of the code side by side by
running this script from each checkout, e.g.

    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old .venv/bin/python benchmarks/model_speed.py --single-thread --systems lips,gete
    .venv/bin/python benchmarks/model_speed.py --single-thread --systems lips,gete

Usage:
  .venv/bin/python benchmarks/model_speed.py [--systems lips,gete] [--models mace] [--calls 10]
        [--single-thread] [--dtype float64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default="md17-ethanol,md17-aspirin,lips,gete")
    ap.add_argument("--models", default="mace")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--single-thread", action="store_true", help="one XLA thread (CPU time comparable under load)")
    ap.add_argument("--data-mirror", default=os.environ.get("JAXBENCH_DATA_MIRROR"))
    args = ap.parse_args(argv)
    if args.single_thread:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    import ase
    import jax
    import jax.numpy as jnp
    import numpy as np

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from md_throughput import load_system

    import jaxbench
    from jaxbench.graph import graph_from_atoms
    from jaxbench.potential import Potential, cast_params, model_card
    from jaxbench.stats import DatasetStatistics

    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    print(f"jaxbench from {Path(jaxbench.__file__).parent}; {args.dtype}; "
          f"{'1 XLA thread' if args.single_thread else 'all cores'}; {args.calls} calls each")
    print(f"| system | atoms | edges | model | wall ms / call | CPU ms / call |")
    print(f"|---|---|---|---|---|---|")
    for name in [s for s in args.systems.split(",") if s]:
        s = load_system(name, args.data_mirror)
        atoms = ase.Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])
        species = tuple(sorted(set(s["numbers"])))
        for model in [m for m in args.models.split(",") if m]:
            card = model_card(model)
            r_max = float(card["hyperparameters"]["r_max"])
            g = graph_from_atoms(atoms, r_max)
            n_edges = int(np.sum(g.edge_mask))
            stats = DatasetStatistics(species=species, atomic_energies={z: 0.0 for z in species},
                                      energy_per_atom_mean=0.0, energy_per_atom_std=1.0, force_rms=1.0,
                                      avg_num_neighbors=max(1.0, n_edges / len(atoms)), cutoff=r_max, n_frames=1)
            pot = Potential.from_card(card, stats)
            params = cast_params(pot.init(jax.random.PRNGKey(0), g), dtype)
            f = jax.jit(lambda p, x: jax.value_and_grad(lambda y: pot.energy(p, g, positions=y)[0])(x))
            x = jnp.asarray(g.positions, dtype)
            for _ in range(3):
                jax.block_until_ready(f(params, x))
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(args.calls):
                jax.block_until_ready(f(params, x))
            wall = (time.perf_counter() - t0) / args.calls
            cpu = (time.process_time() - c0) / args.calls
            print(f"| {name} | {len(atoms)} | {n_edges} | {model} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
