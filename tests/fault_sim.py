"""A small simulation for tests/test_faults.py to kill: ``python tests/fault_sim.py OUT.h5 [--resume]``.

Liquid argon under Lennard-Jones, 2 replicas over 2 CPU devices, Langevin (the RNG key is state),
replica 1 started with two atoms 1.6 Å apart so it fails early (its frozen state and failure step must
survive a resume as well)."""

from __future__ import annotations

import sys

import numpy as np

A_FCC = 5.8
BASE = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def main(argv):
    import jax

    import jaxbench

    jax.config.update("jax_enable_x64", True)
    jaxbench.use_cpu_devices(2)
    from jaxbench import md

    out, resume = argv[0], "--resume" in argv
    cells = int(argv[argv.index("--cells") + 1]) if "--cells" in argv else 3
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 2000
    pos = np.array([(b + np.array([i, j, k])) * A_FCC for i in range(cells) for j in range(cells) for k in range(cells)
                    for b in BASE])
    pos = np.stack([pos, pos])
    pos[1, 1] = pos[1, 0] + [1.6, 0.0, 0.0]
    start = md.Start.make(pos, [18] * pos.shape[1], np.eye(3) * cells * A_FCC, True)
    p = md.Protocol(ensemble="nvt_langevin", temperature_K=120.0, timestep_fs=5.0, steps=steps, replicas=2,
                    save_every=10, chunk_steps=100, friction_per_fs=0.01)
    res = md.simulate(md.lennard_jones(cutoff=7.0), start, p, seed=11, out=out, resume=resume, progress=False)
    print("done", res.steps_done, list(res.failed), flush=True)
    return 0


def run_cli(main_fn):
    """Exit as the jaxbench CLI does: 128 + signal after an interrupted run."""
    from jaxbench.errors import Interrupted

    try:
        sys.exit(main_fn(sys.argv[1:]))
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    run_cli(main)
