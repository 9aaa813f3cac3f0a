"""Training throughput: frames per second of one full training step, jaxbench MACE beside mace-torch MACE.

One step = forward, forces (-dE/dpositions), loss, backward, gradient clipping, optimizer update and EMA
update, on a batch that is already assembled (the data pipeline is timed separately for jaxbench, as
"batch assembly", and left out of both step columns).

  jaxbench    the jitted step `jaxbench.train` trains with (`step_functions`), EGraFFBench card `mace`:
              WeightedEnergyForcesLoss weights (energy per atom 1, forces 10), AMSGrad lr 0.01, weight
              decay 5e-7 on the card's `weight_decay_on` leaves, clip 10, EMA 0.99; padded batches as
              `train` builds them, split over the CPU devices as `train` does (one device per core,
              `jaxbench.use_cpu_devices`; data-parallel, at most one device per frame; `--devices 1`: off).
  mace-torch  `mace.tools.train.take_step` (the step mace-torch's run_train loops over) on
              `ScaleShiftMACE` built with the card's hyperparameters (as benchmarks/param_counts.py does:
              RealAgnosticInteractionBlock first, residual blocks after; mace-torch's training CLI default
              use_reduced_cg=False, i.e. the full U matrices), `WeightedEnergyForcesLoss(1, 10)`,
              `get_params_options` + `get_optimizer` (torch Adam amsgrad=True, the same weight-decay
              groups), clip_grad_norm 10, torch_ema EMA 0.99; batches from mace's AtomicData + its
              torch_geometric DataLoader.

Both sides float32 (mace-torch's own CLI default is float64; `--dtype float64` runs both in float64).
The torch side runs in the reference venv (`--ref-python`, default $JAXBENCH_REF_PYTHON or
/work/refenv/bin/python) as a subprocess of this same file, like benchmarks/param_counts.py.

Usage:
  .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--warmup 3] [--dtype float32]
        [--cases md17-ethanol:5,lips:1] [--card mace] [--md benchmarks/results/train_throughput.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = "md17-ethanol:5,lips:1"


# =============================================================================================
# Torch side (runs under --ref-python; imports nothing from jax / jaxbench)
# =============================================================================================
def torch_worker() -> None:
    """Read one spec (JSON, stdin): card hyperparameters, training settings, frames; print timings (JSON)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    spec = json.load(sys.stdin)
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        import ase
        import numpy as np
        import torch

        if hasattr(torch.serialization, "add_safe_globals"):  # e3nn constants file holds `slice` objects
            torch.serialization.add_safe_globals([slice])
        from mace import data as mdata
        from mace import modules, tools
        from mace.tools import torch_geometric
        from mace.tools.scripts_utils import get_optimizer, get_params_options
        from mace.tools.train import take_step
        from torch_ema import ExponentialMovingAverage

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from param_counts import _HP, _ref_scaleshift_mace

        torch.set_default_dtype(getattr(torch, spec["dtype"]))
        torch.manual_seed(0)
        species = [int(z) for z in spec["species"]]
        h = _HP(spec["hyperparameters"])
        model, _notes = _ref_scaleshift_mace(h, len(species), 3)
        # the builder fills in H, C, O; rebuild the species table and atomic energies for this dataset
        model.atomic_numbers = torch.tensor(species, dtype=torch.int64)
        model.to(getattr(torch, spec["dtype"]))
        tr = spec["training"]
        z_table = tools.AtomicNumberTable(species)
        keyspec = mdata.KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
        configs = []
        for f in spec["frames"]:
            atoms = ase.Atoms(numbers=f["numbers"], positions=f["positions"], cell=f["cell"], pbc=f["pbc"])
            atoms.info["REF_energy"] = f["energy"]
            atoms.arrays["REF_forces"] = np.asarray(f["forces"])
            configs.append(mdata.config_from_atoms(atoms, key_specification=keyspec))
        dataset = [mdata.AtomicData.from_config(c, z_table=z_table, cutoff=float(h.get("r_max", required=True))) for c in configs]
        loader = torch_geometric.dataloader.DataLoader(dataset, batch_size=spec["batch_size"], shuffle=False, drop_last=True)
        batches = list(loader)
        w = tr["loss_weights"]
        loss_fn = modules.WeightedEnergyForcesLoss(energy_weight=w["energy"], forces_weight=w["forces"])
        opt_args = argparse.Namespace(lr=tr["learning_rate"], weight_decay=tr["weight_decay"], lr_params_factors="{}",
                                      freeze=None, amsgrad=tr["optimizer"] == "amsgrad", beta=0.9, optimizer="adam")
        optimizer = get_optimizer(opt_args, get_params_options(opt_args, model))
        ema = ExponentialMovingAverage(model.parameters(), decay=tr["ema_decay"]) if tr.get("ema") else None
        output_args = {"energy": True, "forces": True, "virials": False, "stress": False, "dipoles": False}
        device = torch.device("cpu")
        model.train()
        for i in range(spec["warmup"]):
            take_step(model, loss_fn, batches[i % len(batches)], optimizer, ema, output_args, tr["clip_grad"], device)
        # torch's default (one OpenMP thread per core) spin-waits for descheduled siblings when the machine
        # is busy (5-10x slower per step here); keep the faster of 1 thread and all cores, timed alternately
        # (the fix and measurements are in BENCHMARKS.md, MD throughput)
        all_threads = torch.get_num_threads()
        options = sorted({1, all_threads})
        probe = {n: [] for n in options}
        for r in range(2):
            for n in options:
                torch.set_num_threads(n)
                for i in range(2):
                    t0 = time.perf_counter()
                    take_step(model, loss_fn, batches[(r + i) % len(batches)], optimizer, ema, output_args, tr["clip_grad"], device)
                    probe[n].append(time.perf_counter() - t0)
        thread_ms = {n: 1e3 * float(np.median(v)) for n, v in probe.items()}
        torch.set_num_threads(min(options, key=thread_ms.__getitem__))
        times = []
        for i in range(spec["steps"]):
            t0 = time.perf_counter()
            loss, _ = take_step(model, loss_fn, batches[i % len(batches)], optimizer, ema, output_args, tr["clip_grad"], device)
            float(loss)
            times.append(time.perf_counter() - t0)
        out = dict(times=times, params=int(sum(p.numel() for p in model.parameters())),
                   threads=torch.get_num_threads(), step_ms_by_threads=thread_ms, versions={"torch": torch.__version__,
                                                              "mace-torch": _version("mace-torch")})
    real_stdout.write(json.dumps(out))
    real_stdout.flush()


def _version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# =============================================================================================
# JAX side (project venv)
# =============================================================================================
def jax_throughput(card, frames, batch_size: int, steps: int, warmup: int, dtype: str, devices: int = 1) -> dict:
    import jax
    import numpy as np

    from jaxbench.graph import build_graphs
    from jaxbench.potential import Potential
    from jaxbench.stats import compute_statistics
    from jaxbench.train import TrainingConfig, cast_graph, init_params, make_optimizer, step_functions

    r_max = float(card["hyperparameters"]["r_max"])
    stats = compute_statistics(frames, r_max)
    pot = Potential.from_card(card, stats)
    cfg = TrainingConfig.from_card(card)
    fg = build_graphs(frames, r_max)
    n_batches = len(frames) // batch_size

    devices = max(1, min(devices, batch_size, len(jax.local_devices())))

    def assemble(i):
        idx = np.arange(i * batch_size, (i + 1) * batch_size)
        if devices > 1:  # as `jaxbench.train`: the batch split over the devices, data-parallel step
            return cast_graph(fg.sharded_batch(idx, devices, n_graph=batch_size), dtype)
        return cast_graph(fg.batch(idx, n_graph=batch_size), dtype)

    t0 = time.perf_counter()
    batches = [assemble(i) for i in range(n_batches)]
    t_assemble = (time.perf_counter() - t0) / n_batches
    tx = make_optimizer(cfg)
    step_fn, _eval, init_fn = step_functions(pot, cfg, tx, compute_stress=False, devices=devices)
    params = init_params(pot, init_fn, jax.random.PRNGKey(0), cast_graph(fg.batch(np.arange(batch_size), n_graph=batch_size), dtype),
                          np.dtype(dtype))
    state = dict(params=params, opt_state=tx.init(params), ema_params=params)
    weights = cfg.weights
    t0 = time.perf_counter()
    for i in range(warmup):
        state, loss, sums = step_fn(state, batches[i % n_batches], cfg.learning_rate, weights, float(i + 1))
        float(loss)
    t_compile = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, loss, sums = step_fn(state, batches[i % n_batches], cfg.learning_rate, weights, float(warmup + i + 1))
        float(loss)  # the training loop reads the loss every step (NaN check): include the sync
        times.append(time.perf_counter() - t0)
    return dict(times=times, assemble_s=t_assemble, warmup_s=t_compile, params=pot.num_parameters(params), devices=devices,
                n_batches=n_batches, shapes=sorted({tuple(b.positions.shape[:-1]) + tuple(b.senders.shape) for b in batches}))


def frames_for_torch(frames) -> list[dict]:
    import numpy as np

    out = []
    off = frames.offsets
    for i in range(len(frames)):
        n = int(frames.n_atoms[i])
        sl = slice(int(off[i]), int(off[i]) + n)
        cell = np.asarray(frames.cell[i]) if frames.cell is not None else np.zeros((3, 3))
        pbc = [bool(x) for x in np.asarray(frames.pbc[i] if np.ndim(frames.pbc) == 2 else frames.pbc)] if frames.pbc is not None else [False] * 3
        out.append(dict(numbers=frames.numbers[sl].tolist(), positions=frames.positions[sl].tolist(), cell=cell.tolist(),
                        pbc=pbc, energy=float(frames.energy[i]), forces=frames.forces[sl].tolist()))
    return out


def run_torch(ref_python: str, spec: dict) -> dict:
    if not Path(ref_python).exists():
        return {"error": f"reference interpreter {ref_python} not found (see benchmarks/README.md)"}
    proc = subprocess.run([ref_python, str(Path(__file__).resolve()), "--torch-worker"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=3600)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"reference subprocess failed (rc {proc.returncode}): {' | '.join(tail)}"}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ref-python", default=os.environ.get("JAXBENCH_REF_PYTHON", "/work/refenv/bin/python"))
    ap.add_argument("--card", default="mace")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="dataset:batch_size,... (default %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per case and code")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--devices", type=int, help="split each jaxbench batch over this many CPU devices, as `jaxbench train` "
                    "does (default: one per core, at most the batch size)")
    ap.add_argument("--md", help="also write the table and the command to this markdown file")
    ap.add_argument("--json", help="also write the raw timings")
    args = ap.parse_args(argv)
    if args.torch_worker:
        torch_worker()
        return 0
    import jaxbench

    jaxbench.use_cpu_devices(args.devices)
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import numpy as np

    from jaxbench import data
    from jaxbench.potential import model_card
    from jaxbench.train import TrainingConfig

    card = model_card(args.card)
    card.pop("_path", None)
    cfg = TrainingConfig.from_card(card)
    rows, raw = [], []
    for case in args.cases.split(","):
        name, bs = case.split(":")
        bs = int(bs)
        n_frames = bs * max(4, min(args.steps, 10))  # a few distinct batches, cycled
        frames = data.load(name, "train")[np.arange(n_frames)]
        print(f"[{name} batch {bs}] jaxbench ...", file=sys.stderr, flush=True)
        jx = jax_throughput(card, frames, bs, args.steps, args.warmup, args.dtype,
                            devices=args.devices or len(jax.local_devices()))
        spec = dict(hyperparameters=card["hyperparameters"], species=sorted(set(int(z) for z in frames.numbers)),
                    training=dict(optimizer=cfg.optimizer, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  loss_weights=cfg.weights, clip_grad=cfg.clip_grad, ema=cfg.ema, ema_decay=cfg.ema_decay),
                    frames=frames_for_torch(frames), batch_size=bs, steps=args.steps, warmup=args.warmup, dtype=args.dtype)
        print(f"[{name} batch {bs}] mace-torch ...", file=sys.stderr, flush=True)
        tt = run_torch(args.ref_python, spec)
        j_fps = bs / _median(jx["times"])
        t_fps = bs / _median(tt["times"]) if "times" in tt else None
        rows.append(dict(dataset=name, batch=bs, atoms=int(frames.n_atoms[0]), jax_fps=j_fps, torch_fps=t_fps,
                         jax_ms=1e3 * _median(jx["times"]), torch_ms=1e3 * _median(tt["times"]) if t_fps else None,
                         best_ratio=(min(tt["times"]) / min(jx["times"])) if t_fps else None,
                         assemble_ms=1e3 * jx["assemble_s"], compile_s=jx["warmup_s"], jax_params=jx["params"], jax_devices=jx["devices"],
                         torch_params=tt.get("params"), error=tt.get("error"), versions=tt.get("versions"),
                         torch_threads=tt.get("threads"), torch_step_ms_by_threads=tt.get("step_ms_by_threads")))
        raw.append(dict(case=case, jaxbench=jx, torch=tt))
    cmd = "JAXBENCH_DATA_MIRROR=... .venv/bin/python benchmarks/" + Path(__file__).name + " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    versions = next((r["versions"] for r in rows if r.get("versions")), {}) or {}
    lines = [
        f"Training throughput, card `{args.card}` (EGraFFBench Table 14), {args.dtype}, median of {args.steps} steps after "
        f"{args.warmup} warm-up steps; {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {versions.get('torch')}, mace-torch {versions.get('mace-torch')}.",
        "",
        "| dataset | atoms | batch | jaxbench devices | jaxbench frames/s | mace-torch frames/s | ratio jaxbench / mace-torch | ratio, fastest steps | jaxbench ms/step | mace-torch ms/step | jaxbench batch assembly ms | jaxbench compile s | params jaxbench / mace-torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["torch_fps"] is None:
            lines.append(f"| {r['dataset']} | {r['atoms']} | {r['batch']} | {r['jax_devices']} | {r['jax_fps']:.2f} | error: {r['error']} | - | - | "
                         f"{r['jax_ms']:.1f} | - | {r['assemble_ms']:.2f} | {r['compile_s']:.0f} | {r['jax_params']:,} / - |")
            continue
        lines.append(f"| {r['dataset']} | {r['atoms']} | {r['batch']} | {r['jax_devices']} | {r['jax_fps']:.2f} | {r['torch_fps']:.2f} | "
                     f"{r['jax_fps'] / r['torch_fps']:.2f} | {r['best_ratio']:.2f} | {r['jax_ms']:.1f} | {r['torch_ms']:.1f} | "
                     f"{r['assemble_ms']:.2f} | {r['compile_s']:.0f} | "
                     f"{r['jax_params']:,} / {r['torch_params']:,} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", "Ratio > 1: jaxbench is faster. frames/s = batch / median step time; \"fastest steps\" compares the "
              "fastest timed step of each (less sensitive to other processes on the machine). jaxbench compile s: "
              f"the warm-up steps, which include jit compilation. Load average at the end of the run: {load:.1f}. "
              "mace-torch ran with the faster of 1 thread and all cores, timed per case: " + "; ".join(
                  f"{r['dataset']}: {r.get('torch_threads')} (ms per step by threads: "
                  + ", ".join(f"{n}: {v:.0f}" for n, v in (r.get('torch_step_ms_by_threads') or {}).items()) + ")"
                  for r in rows if r.get("torch_fps")) + ".",
              "", f"Command: `{cmd}`"]
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text("## Training throughput (`benchmarks/train_throughput.py`)\n\n" + text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, raw=raw), indent=2, default=str))
    return 0 if all(r["torch_fps"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
