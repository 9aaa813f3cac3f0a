"""Neighbor-list benchmark.

1. Static list: ``jaxbench.neighbors.neighbor_pairs`` vs ``ase.neighborlist.neighbor_list('ijSd')``,
   time per frame, measured side by side (interleaved repeats) on the same frames.
2. MD list: cost per ``update`` step of both methods on LiPS (and 'multi_image' on P2S5), inside one jitted ``lax.scan`` over a
   random-walk trajectory (small displacements, so rebuilds are occasional), plus the cost of a
   rebuild at every step (skin 0) as the build cost.

Usage: python benchmarks/neighbors.py [--data DIR] [--frames 20] [--repeats 7] [--steps 200] [--float32]
Times are medians over repeats (time.perf_counter); process time is shown too (CPU-seconds per
frame / step), since the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def data_dir(arg: str | None) -> Path:
    for p in (arg, os.environ.get("JAXBENCH_DATA_MIRROR"), REPO.parent / "shared/data/egraffbench"):
        if p and (Path(p) / "Datasets").is_dir():
            return Path(p)
    sys.exit("reference data not found: pass --data or set JAXBENCH_DATA_MIRROR")


def load_systems(root: Path, n_frames: int):
    """name -> (positions [F, N, 3], cell, pbc)."""
    out = {}
    z = np.load(root / "Datasets/Data_lips/data/val/nequip_npz.npz")
    out["LiPS"] = (z["pos"][:n_frames], np.asarray(z["cell"]).reshape(3, 3), np.asarray(z["pbc"], bool))
    z = np.load(root / "Datasets/GeTe/data/test/nequip_npz.npz")
    out["GeTe"] = (z["pos"][:n_frames], np.asarray(z["cell"]).reshape(3, 3), np.asarray(z["pbc"], bool))
    for name, formula in (("Li48P16S61", "Li48P16S61"), ("P2S5", "Li0P8S20")):
        d = root / f"Datasets/All_LiPS20/{name}/3000K/deepmd/{formula}/set.000"
        coord = np.load(d / "coord.npy")[:n_frames]
        out[name] = (coord.reshape(len(coord), -1, 3), np.load(d / "box.npy")[0].reshape(3, 3), np.ones(3, bool))
    return out


def machine_info() -> str:
    import ase
    import jax
    import scipy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count()
    try:
        load = " load avg %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = ""
    return (
        f"machine: {platform.node()} {platform.system()} {platform.release()} | {cpu} | {ncpu} usable cores |{load}\n"
        f"python {platform.python_version()} numpy {np.__version__} scipy {scipy.__version__} "
        f"ase {ase.__version__} jax {jax.__version__} devices {[str(d) for d in jax.devices()]} "
        f"x64 {jax.config.jax_enable_x64}"
    )


def timed(fn, repeats):
    """Median wall and CPU seconds of fn() over repeats (one warm-up call)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def bench_static(systems, cutoff, repeats):
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    from jaxbench.neighbors import neighbor_pairs

    print(f"\n## static neighbor list, cutoff {cutoff} Å (median over {repeats} repeats, per frame)")
    header = (
        f"{'system':<12} {'atoms':>5} {'frames':>6} {'pairs/frame':>11} | {'jaxbench ms':>11} {'cpu ms':>7} | "
        f"{'ASE ms':>8} {'cpu ms':>7} | {'ASE/jaxbench':>12}"
    )
    print(header)
    print("-" * len(header))
    for name in ("LiPS", "GeTe", "Li48P16S61"):
        pos, cell, pbc = systems[name]
        frames = len(pos)
        atoms = [Atoms(positions=p, cell=cell, pbc=pbc) for p in pos]
        pairs = [len(neighbor_pairs(p, cell, pbc, cutoff)[0]) for p in pos]
        ase_pairs = [len(neighbor_list("i", a, cutoff)) for a in atoms]
        assert pairs == ase_pairs, (name, pairs, ase_pairs)

        def ours():
            for p in pos:
                neighbor_pairs(p, cell, pbc, cutoff)

        def theirs():
            for a in atoms:
                neighbor_list("ijSd", a, cutoff)

        ours(), theirs()  # warm-up
        w_o, c_o, w_a, c_a = [], [], [], []
        for _ in range(repeats):  # interleaved, so both see the same machine load
            w, c = time.perf_counter(), time.process_time()
            ours()
            w_o.append(time.perf_counter() - w), c_o.append(time.process_time() - c)
            w, c = time.perf_counter(), time.process_time()
            theirs()
            w_a.append(time.perf_counter() - w), c_a.append(time.process_time() - c)
        mo, ma = statistics.median(w_o) / frames * 1e3, statistics.median(w_a) / frames * 1e3
        co, ca = statistics.median(c_o) / frames * 1e3, statistics.median(c_a) / frames * 1e3
        print(
            f"{name:<12} {pos.shape[1]:>5} {frames:>6} {np.mean(pairs):>11.0f} | {mo:>11.3f} {co:>7.3f} | "
            f"{ma:>8.3f} {ca:>7.3f} | {ma / mo:>11.1f}x"
        )


def bench_md(systems, cutoff, skin, steps, sigma, repeats, float32):
    import jax
    import jax.numpy as jnp

    from jaxbench.neighbors import md_neighbor_list

    dtype = np.float32 if float32 else np.float64
    print(
        f"\n## MD neighbor list update, cutoff {cutoff} Å, jitted lax.scan of {steps} steps, random walk "
        f"sigma {sigma} Å/step/coordinate, {np.dtype(dtype).name}, median over {repeats} repeats"
    )
    header = (
        f"{'system':<12} {'atoms':>5} {'method':<12} {'skin':>5} {'capacity':>8} {'builds':>7} | "
        f"{'us/step':>9} {'cpu us':>8} | {'compile s':>9}"
    )
    print(header)
    print("-" * len(header))
    cases = [("LiPS", "jax_md"), ("LiPS", "multi_image"), ("P2S5", "multi_image")]
    for name, method in cases:
        pos, cell, pbc = systems[name]
        r0 = pos[0]
        rng = np.random.default_rng(0)
        walk = r0 + np.cumsum(rng.normal(size=(steps,) + r0.shape) * sigma, axis=0)
        traj = jnp.asarray(walk.astype(dtype))
        for sk in (skin, 0.0):
            fns = md_neighbor_list(cell, pbc, cutoff, skin=sk, method=method)
            nbrs = fns.allocate(traj[0])

            @jax.jit
            def run(n, t, fns=fns):
                def body(c, r):
                    c = fns.update(r, c)
                    return c, c.n_pairs

                return jax.lax.scan(body, n, t)

            t0 = time.perf_counter()
            final, _ = jax.block_until_ready(run(nbrs, traj))
            compile_s = time.perf_counter() - t0
            assert not bool(final.did_overflow)
            builds = int(final.n_builds) - 1
            wall, cpu = timed(lambda: jax.block_until_ready(run(nbrs, traj)), repeats)
            print(
                f"{name:<12} {r0.shape[0]:>5} {method:<12} {sk:>5.2f} {nbrs.capacity:>8} {builds:>7} | "
                f"{wall / steps * 1e6:>9.1f} {cpu / steps * 1e6:>8.1f} | {compile_s:>9.2f}"
            )
    print("(skin 0: rebuild at every step = the build cost; builds = rebuilds during the scan;")
    print(" P2S5's cell is below 2 * (cutoff + skin), so only 'multi_image' applies there)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="egraffbench mirror root (contains Datasets/)")
    ap.add_argument("--frames", type=int, default=20, help="frames per system for the static list")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cutoff", type=float, default=5.0)
    ap.add_argument("--skin", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sigma", type=float, default=0.01, help="random-walk step (Å per coordinate)")
    ap.add_argument("--float32", action="store_true", help="MD part in float32 (default float64)")
    args = ap.parse_args(argv)

    import jax

    if not args.float32:
        jax.config.update("jax_enable_x64", True)

    print("command: " + " ".join([Path(sys.executable).name] + sys.argv))
    print(machine_info())
    systems = load_systems(data_dir(args.data), args.frames)
    bench_static(systems, args.cutoff, args.repeats)
    bench_md(systems, args.cutoff, args.skin, args.steps, args.sigma, args.repeats, args.float32)


if __name__ == "__main__":
    main()
