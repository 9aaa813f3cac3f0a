"""MD throughput: atom-steps per second of jaxbench vs mace-torch + ASE (and mlip, if it runs).

For each system (a test frame of md17-ethanol, md17-aspirin, lips, gete) and model card (the full
EGraFFBench `mace` and `nequip` cards, RANDOM weights: throughput does not depend on the weights'
values, only on the architecture and the neighbor count) this measures:

  * jaxbench, R replicas batched (default 5) and 1 replica: `jaxbench.md.simulate`, Langevin at the
    egraffbench card's temperature and timestep (the ensemble of the mace-torch + ASE baseline), one
    compiled chunk of --steps steps, nothing written to disk; the R replicas split over --devices CPU
    devices (default: one per core, `jaxbench.use_cpu_devices`). Run twice: the first call compiles
    (compile time = first - second), the second is timed.
  * mace-torch + ASE Langevin (MACE card only: same hyperparameters, random weights, float64 as
    mace's ASE calculator defaults), in the reference venv (--ref-python) as a subprocess of this file.
  * mlip (InstaDeep's JAX library) in its own venv (--mlip-python), if it is installed and runs;
    otherwise the reason is printed.

atom-steps/s = replicas x atoms x steps / seconds (wall clock; process CPU time is printed too because
the machine is shared). Also printed per jaxbench row:
  * compile time (s);
  * achieved FLOP/s = XLA cost analysis FLOPs of one jitted energy+forces call (the model's forward +
    backward: `jax.jit(value_and_grad(E)).lower(...).compile().cost_analysis()['flops']`) x force calls
    (replicas x steps) / wall seconds, as a fraction of the CPU's peak. The integrator and neighbor
    list updates are not counted (they are O(N) and O(pairs) against the model's O(pairs x channels^2)).
    Peak = physical cores x clock (GHz) x FMA units per core (2) x SIMD lanes (512-bit AVX-512: 8 fp64
    / 16 fp32; 256-bit AVX2: 4 / 8) x 2 FLOPs per FMA, from `lscpu` (cores, flags) and the clock
    (lscpu "CPU max MHz", else /proc/cpuinfo "cpu MHz");
  * peak resident memory of the process so far (resource.getrusage ru_maxrss).

Random weights make an unphysical potential. To keep every replica running for the whole measurement
(a failed replica is frozen and skipped by `lax.map`, which would inflate the rate) the energy scale is
set small (statistics force_rms --force-scale eV/Å) and the molecular bond-stretch criterion is off
(bond_factor 0); the replicas that still failed are reported (column `failed`).

Usage:
  .venv/bin/python benchmarks/md_throughput.py [--systems md17-ethanol,md17-aspirin,lips,gete]
      [--models mace,nequip] [--steps 100] [--replicas 5] [--torch-steps 50] [--dtype float64|float32]
      [--batch map,vmap] [--devices 1,2]
      [--ref-python /work/refenv/bin/python] [--mlip-python /work/mlipenv/bin/python] [--skip torch,mlip,single]
      [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("md17-ethanol", "md17-aspirin", "lips", "gete")
MODELS = ("mace", "nequip")
# measured before the project started on this kind of machine (issue 5), atom-steps/s
BASELINE_TORCH = {"md17-ethanol": 218, "md17-aspirin": 335, "lips": 534, "gete": 783}
BASELINE_MLIP = {"md17-ethanol": 1260, "md17-aspirin": 955, "lips": 500, "gete": 819}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# =============================================================================================
# CPU peak
# =============================================================================================
def cpu_peak() -> dict:
    """Peak FLOP/s from lscpu: cores x GHz x 2 FMA units x lanes x 2 (see the module docstring)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    sockets = int(info.get("Socket(s)", 1))
    cores = int(info.get("Core(s) per socket", info.get("CPU(s)", 1))) * sockets
    mhz = None
    for key in ("CPU max MHz", "CPU MHz"):
        if key in info:
            mhz = float(info[key])
            break
    if mhz is None:
        m = re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
        mhz = float(m.group(1)) if m else float("nan")
    flags = info.get("Flags", "")
    bits = 512 if "avx512f" in flags.split() else 256 if "avx2" in flags.split() else 128
    fma_units = 2
    ghz = mhz / 1000.0
    peak64 = cores * ghz * 1e9 * fma_units * (bits // 64) * 2
    return dict(model=info.get("Model name", "?"), cores=cores, ghz=ghz, simd_bits=bits, fma_units=fma_units,
                peak_fp64=peak64, peak_fp32=2 * peak64,
                formula=f"{cores} cores x {ghz:.2f} GHz x {fma_units} FMA units x {bits // 64} fp64 lanes ({bits}-bit) x 2 "
                        f"= {peak64 / 1e9:.0f} GFLOP/s fp64 ({2 * peak64 / 1e9:.0f} fp32)")


# =============================================================================================
# systems
# =============================================================================================
def load_system(name: str, mirror: str | None) -> dict:
    from jaxbench import data

    frames = data.load(name, "test", mirror=mirror)
    f = frames.frame(0)
    return dict(name=name, positions=f["positions"].tolist(), numbers=f["numbers"].tolist(), cell=f["cell"].tolist(),
                pbc=[bool(x) for x in f["pbc"]])


# =============================================================================================
# jaxbench
# =============================================================================================
def jaxbench_rows(system: dict, model_name: str, args, peak: dict) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxbench import md
    from jaxbench.graph import graph_from_atoms, md_graph
    from jaxbench.neighbors import md_neighbor_list, neighbor_pairs
    from jaxbench.potential import Potential, cast_params, model_card
    from jaxbench.stats import DatasetStatistics

    import ase

    pos = np.asarray(system["positions"])
    numbers = np.asarray(system["numbers"], np.int32)
    cell, pbc = np.asarray(system["cell"]), np.asarray(system["pbc"])
    card = model_card(model_name)
    r_max = float(card["hyperparameters"]["r_max"])
    species = tuple(sorted(set(numbers.tolist())))
    n_pairs = len(neighbor_pairs(pos, cell, pbc, r_max)[0])
    stats = DatasetStatistics(species=species, atomic_energies={z: 0.0 for z in species}, energy_per_atom_mean=0.0,
                              energy_per_atom_std=1.0, force_rms=float(args.force_scale),
                              avg_num_neighbors=max(1.0, n_pairs / len(numbers)), cutoff=r_max, n_frames=1)
    pot = Potential.from_card(card, stats)
    atoms = ase.Atoms(numbers=numbers, positions=pos, cell=cell, pbc=pbc)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    params = cast_params(pot.init(jax.random.PRNGKey(0), graph_from_atoms(atoms, r_max)), dtype)
    n_params = pot.num_parameters(params)
    base = md.load_protocol("egraffbench", system["name"])
    rows = []
    devs = [int(d) for d in args.devices.split(",")] if args.devices else [len(jax.local_devices())]
    configs = [(args.replicas, b, d) for b in args.batch.split(",") for d in devs] + ([] if "single" in args.skip else [(1, "map", 1)])
    for R, batch, n_dev in configs:
        n_dev = min(n_dev, R)
        p = base.replace(ensemble="nvt_langevin", friction_per_fs=0.01, steps=args.steps, save_every=args.steps,
                         chunk_steps=args.steps, replicas=R, bond_factor=0.0)
        start = md.Start.make(pos, numbers, cell, pbc, replicas=R)
        c0, t0 = time.process_time(), time.perf_counter()
        first = md.simulate(pot, start, p, params=params, seed=0, progress=False, keep_arrays=False, batch=batch,
                            devices=n_dev)
        t_first = time.perf_counter() - t0
        c1, t1 = time.process_time(), time.perf_counter()
        res = md.simulate(pot, start, p, params=params, seed=0, progress=False, keep_arrays=False, batch=batch,
                          devices=n_dev)
        wall = time.perf_counter() - t1
        cpu = time.process_time() - c1
        run_s = res.timings["first_chunk_s"] + res.timings["chunks_s"]
        # FLOPs of one energy+forces call of this model on this system (XLA cost analysis)
        nl = md_neighbor_list(cell, pbc, r_max, skin=p.skin, capacity_multiplier=p.capacity_multiplier,
                              compact_edges=p.skin > 0)  # as the engine: the model sees pairs within r_max
        nbrs = nl.allocate(pos)

        def energy(pp, x, nb):
            return pot.energy(pp, md_graph(x, numbers, cell, pbc, nb))[0]

        fn = jax.jit(jax.value_and_grad(energy, argnums=1))
        ca = fn.lower(params, jnp.asarray(pos), nbrs).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops = float(ca.get("flops", float("nan")))
        achieved = flops * R * args.steps / run_s
        peak_flops = peak["peak_fp64"] if args.dtype == "float64" else peak["peak_fp32"]
        rows.append(dict(
            system=system["name"], model=model_name, engine=f"jaxbench x{R}" + (f" {batch}" if batch != "map" else "") + (f" {n_dev} dev" if n_dev > 1 else ""), replicas=R, devices=n_dev, atoms=len(numbers),
            steps=args.steps, run_s=run_s, wall_s=wall, cpu_s=cpu, atom_steps_s=R * len(numbers) * args.steps / run_s,
            compile_s=max(0.0, t_first - wall), flops_per_call=flops, achieved_gflops=achieved / 1e9,
            peak_fraction=achieved / peak_flops, rss_mb=rss_mb(), failed=int(res.failed.sum()) + int(first.failed.sum()),
            params=n_params, dtype=args.dtype, capacity=res.capacity, edge_capacity=res.edge_capacity,
        ))
        print(f"  {rows[-1]['engine']:>12s} {model_name:7s} {system['name']:13s} {rows[-1]['atom_steps_s']:9.0f} atom-steps/s"
              f"  (run {run_s:.2f} s, cpu {cpu:.2f} s, compile {rows[-1]['compile_s']:.1f} s, "
              f"{achieved / 1e9:.2f} GFLOP/s = {100 * achieved / peak_flops:.2f}% of peak, failed {rows[-1]['failed']})", flush=True)
    return rows


# =============================================================================================
# mace-torch + ASE (runs under --ref-python; imports nothing from jax / jaxbench)
# =============================================================================================
def torch_worker(spec: dict) -> None:
    import numpy as np
    import torch

    torch.set_default_dtype(torch.float64)
    # MACECalculator deep-copies the model through torch.save / torch.load(weights_only=True), which
    # refuses the `slice` objects inside e3nn modules; the model is our own, so allow them
    torch.serialization.add_safe_globals([slice])
    import ase
    import ase.units as u
    from ase.md.langevin import Langevin
    from e3nn import o3
    from mace import modules
    from mace.calculators import MACECalculator

    hp = spec["hyperparameters"]
    all_threads = torch.get_num_threads()  # torch's default: one OpenMP thread per core

    def tune_threads(calc, atoms) -> tuple[int, dict]:
        """Thread count for this system: the faster of 1 and all cores, timed here on energy+forces calls.
        With all cores on a machine that is also running other jobs (load above the core count) the OpenMP
        workers spin-wait at every parallel region for a descheduled sibling and each call gets 5-10x slower
        than with 1 thread (measured 2026-11-22, BENCHMARKS.md); on an idle machine more threads can win for the
        larger systems. Choosing by timing is what a user tuning torch on the machine would do."""
        probe = atoms.copy()
        probe.calc = calc
        for _ in range(5):  # warm-up: TorchScript profiling executor's first runs, e3nn codegen
            calc.reset()
            probe.get_forces()
        options = sorted({1, all_threads})
        times: dict[int, list[float]] = {n: [] for n in options}
        for _ in range(2):  # alternate the settings: the machine's load drifts
            for n in options:
                torch.set_num_threads(n)
                for _ in range(2):
                    calc.reset()
                    t = time.perf_counter()
                    probe.get_forces()
                    times[n].append(time.perf_counter() - t)
        ms = {n: 1e3 * float(np.median(v)) for n, v in times.items()}
        best = min(options, key=ms.__getitem__)
        torch.set_num_threads(best)
        calc.reset()
        return best, ms

    out = []
    for system in spec["systems"]:
        numbers = system["numbers"]
        species = sorted(set(numbers))
        torch.manual_seed(0)
        model = modules.ScaleShiftMACE(
            r_max=float(hp["r_max"]), num_bessel=int(hp["num_bessel"]), num_polynomial_cutoff=int(hp["num_polynomial_cutoff"]),
            max_ell=int(hp["max_ell"]), interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=int(hp["num_interactions"]), num_elements=len(species), hidden_irreps=o3.Irreps(hp["hidden_irreps"]),
            MLP_irreps=o3.Irreps(hp["mlp_irreps"]), atomic_energies=np.zeros(len(species)), avg_num_neighbors=system["avg_num_neighbors"],
            atomic_numbers=species, correlation=int(hp["correlation"]), gate=modules.gate_dict[hp.get("gate", "silu")],
            radial_MLP=[int(x) for x in hp["radial_mlp"]], atomic_inter_scale=float(spec["force_scale"]), atomic_inter_shift=0.0,
        ).double()
        calc = MACECalculator(models=model, device="cpu", default_dtype="float64")
        atoms = ase.Atoms(numbers=numbers, positions=system["positions"], cell=system["cell"], pbc=system["pbc"])
        atoms.calc = calc
        threads, call_ms = tune_threads(calc, atoms)
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

        MaxwellBoltzmannDistribution(atoms, temperature_K=system["temperature_K"], rng=np.random.default_rng(0))
        dyn = Langevin(atoms, timestep=system["timestep_fs"] * u.fs, temperature_K=system["temperature_K"], friction=0.01 / u.fs,
                       rng=np.random.default_rng(1))
        dyn.run(spec["warmup"])
        c0, t0 = time.process_time(), time.perf_counter()
        dyn.run(spec["steps"])
        wall = time.perf_counter() - t0
        out.append(dict(system=system["name"], model="mace", engine="mace-torch+ASE", replicas=1, atoms=len(numbers),
                        steps=spec["steps"], run_s=wall, wall_s=wall, cpu_s=time.process_time() - c0,
                        atom_steps_s=len(numbers) * spec["steps"] / wall, rss_mb=rss_mb(),
                        params=int(sum(p.numel() for p in model.parameters())), dtype="float64",
                        torch_threads=threads, torch_call_ms_by_threads=call_ms, finite=bool(np.all(np.isfinite(atoms.positions)))))
        print(f"  mace-torch+ASE mace    {system['name']:13s} {out[-1]['atom_steps_s']:9.0f} atom-steps/s "
              f"({threads} torch threads; ms per energy+forces call by threads: "
              + ", ".join(f"{n}: {v:.0f}" for n, v in call_ms.items()) + ")", file=sys.stderr, flush=True)
    print("JSON" + json.dumps(out))


def run_subprocess(python: str, mode: str, spec: dict, timeout: float) -> tuple[list[dict], str]:
    try:
        proc = subprocess.run([python, __file__, mode, json.dumps(spec)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"{type(e).__name__}: {e}"
    skipped = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("mlip:")]
    for line in proc.stdout.splitlines():
        if line.startswith("JSON"):
            return json.loads(line[4:]), "; ".join(skipped)
    err = (proc.stderr or proc.stdout).strip().splitlines()
    return [], f"exit {proc.returncode}: " + " | ".join(err[-3:])


# =============================================================================================
# mlip (runs under --mlip-python)
# =============================================================================================
def mlip_worker(spec: dict) -> None:
    """InstaDeep mlip: its MACE with the card's hyperparameters (random weights) in its jax-md engine,
    Langevin, one replica. Time per episode from a logger; the first episode (compile) is dropped."""
    import ase
    import numpy as np
    from mlip.data import DatasetInfo
    from mlip.models import ForceField, Mace
    from mlip.simulation.jax_md import JaxMDSimulationEngine

    hp = spec["hyperparameters"]
    hidden = [x.strip() for x in hp["hidden_irreps"].split("+")]
    channels = int(hidden[0].split("x")[0])
    node_l = max(int(x.split("x")[1][0]) for x in hidden)
    out = []
    for system in spec["systems"]:
        numbers = system["numbers"]
        species = sorted(set(numbers))
        cell = np.asarray(system["cell"])
        if any(system["pbc"]) and np.abs(cell - np.diag(np.diag(cell))).max() > 1e-9:
            print(f"  mlip: {system['name']} has a non-orthorhombic cell; mlip's jax-md box takes 3 lengths only",
                  file=sys.stderr)
            continue
        info = DatasetInfo(atomic_energies_map={z: 0.0 for z in species}, graph_cutoff_angstrom=float(hp["r_max"]),
                           avg_num_neighbors=float(system["avg_num_neighbors"]), scaling_stdev=float(spec["force_scale"]))
        cfg = Mace.Config(num_layers=int(hp["num_interactions"]), num_channels=channels, l_max=int(hp["max_ell"]),
                          node_symmetry=node_l, correlation=int(hp["correlation"]), num_rbf=int(hp["num_bessel"]),
                          readout_irreps=(hp["mlp_irreps"], "0e"), radial_mlp_hidden=[int(x) for x in hp["radial_mlp"]])
        ff = ForceField.from_mlip_network(Mace(cfg, info), seed=0)
        atoms = ase.Atoms(numbers=numbers, positions=system["positions"], cell=cell, pbc=system["pbc"])
        episodes = spec["episodes"]
        steps = spec["steps"] * episodes
        box = [float(x) for x in np.diag(cell)] if any(system["pbc"]) else None
        config = JaxMDSimulationEngine.Config(num_steps=steps, snapshot_interval=spec["steps"], num_episodes=episodes,
                                              timestep_fs=system["timestep_fs"], temperature_kelvin=system["temperature_K"],
                                              box=box)
        engine = JaxMDSimulationEngine(atoms, ff, config)
        stamps = []
        engine.attach_logger(lambda state: stamps.append((time.perf_counter(), time.process_time())))
        t0 = time.perf_counter()
        engine.run()
        total = time.perf_counter() - t0
        if len(stamps) < 2:
            raise RuntimeError(f"mlip logged {len(stamps)} episodes, need >= 2 to drop the compiling one")
        wall = stamps[-1][0] - stamps[0][0]
        timed_steps = spec["steps"] * (len(stamps) - 1)
        out.append(dict(system=system["name"], model="mace", engine="mlip jax-md", replicas=1, atoms=len(numbers),
                        steps=timed_steps, run_s=wall, wall_s=wall, cpu_s=stamps[-1][1] - stamps[0][1],
                        atom_steps_s=len(numbers) * timed_steps / wall, compile_s=max(0.0, total - wall * len(stamps) / (len(stamps) - 1)),
                        rss_mb=rss_mb(), dtype="float32 (mlip default)"))
        print(f"  mlip jax-md    mace    {system['name']:13s} {out[-1]['atom_steps_s']:9.0f} atom-steps/s", file=sys.stderr, flush=True)
    print("JSON" + json.dumps(out))


# =============================================================================================
# table
# =============================================================================================
def markdown(rows: list[dict], header: dict) -> str:
    lines = [
        f"`{header['command']}`",
        "",
        f"Machine: {header['cpu']['model']}, {header['cpu']['cores']} cores; peak {header['cpu']['formula']}. "
        f"Load average before / after: {header['load_before']} / {header['load_after']} (shared machine: "
        f"other workers were running). jaxbench {header['dtype']} model evaluation, float64 integration; random weights.",
        "",
        "atom-steps/s is wall clock; 'per CPU s' divides by the process CPU time instead (what the run would",
        "reach with the cores to itself, if it is not itself multi-threaded; XLA and torch each used ~1 core here).",
        "",
        "| system | atoms | model | engine | atom-steps/s | per CPU s | vs mace-torch+ASE (this run; wall / CPU) | vs 2023 baseline | compile s | GFLOP/s (% peak) | peak RSS MB | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    torch = {r["system"]: r for r in rows if r["engine"] == "mace-torch+ASE"}
    for r in rows:
        per_cpu = r["replicas"] * r["atoms"] * r["steps"] / r["cpu_s"] if r.get("cpu_s") else float("nan")
        r["atom_steps_cpu_s"] = per_cpu
        ratio = ""
        if r["system"] in torch and r["model"] == "mace":
            t = torch[r["system"]]
            t_cpu = t["replicas"] * t["atoms"] * t["steps"] / t["cpu_s"]
            ratio = f"{r['atom_steps_s'] / t['atom_steps_s']:.1f}x / {per_cpu / t_cpu:.1f}x"
        base = f"{r['atom_steps_s'] / BASELINE_TORCH[r['system']]:.1f}x" if r["model"] == "mace" and r["system"] in BASELINE_TORCH else ""
        fl = f"{r['achieved_gflops']:.2f} ({100 * r['peak_fraction']:.2f}%)" if "achieved_gflops" in r else ""
        comp = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        lines.append(f"| {r['system']} | {r['atoms']} | {r['model']} | {r['engine']} | {r['atom_steps_s']:.0f} | {per_cpu:.0f} | {ratio} | {base} | "
                     f"{comp} | {fl} | {r['rss_mb']:.0f} | {r.get('failed', '')} |")
    for note in header.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=100, help="timed MD steps per jaxbench run (one compiled chunk)")
    ap.add_argument("--torch-steps", type=int, default=50, help="timed MD steps of mace-torch + ASE")
    ap.add_argument("--replicas", type=int, default=5)
    ap.add_argument("--batch", default="map", help="replica layouts for the R-replica runs: map, vmap (comma list)")
    ap.add_argument("--devices", default="", help="split the R replicas over this many CPU devices (comma list; "
                    "default: one per core, jaxbench.use_cpu_devices)")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="jaxbench model evaluation dtype")
    ap.add_argument("--force-scale", type=float, default=0.05, help="statistics force_rms (eV/Å) of the random models")
    ap.add_argument("--ref-python", default="/work/refenv/bin/python")
    ap.add_argument("--mlip-python", default="/work/mlipenv/bin/python")
    ap.add_argument("--skip", default="", help="comma list of: torch, mlip, single, jaxbench")
    ap.add_argument("--data-mirror", default=os.environ.get("JAXBENCH_DATA_MIRROR"))
    ap.add_argument("--markdown", help="write the table (with the command and load) to this file")
    ap.add_argument("--json", help="write all rows as JSON")
    ap.add_argument("--from-json", nargs="+", help="only re-render the table from earlier --json outputs (rows concatenated)")
    args = ap.parse_args(argv)
    if args.from_json:
        runs = [json.loads(Path(j).read_text()) for j in args.from_json]
        header = runs[0]["header"]
        header["notes"] = sum((r["header"].get("notes", []) for r in runs), [])
        table = markdown(sum((r["rows"] for r in runs), []), header)
        print(table)
        if args.markdown:
            Path(args.markdown).write_text(table)
        return 0
    args.skip = set(filter(None, args.skip.split(",")))
    systems = [s for s in args.systems.split(",") if s]
    models = [m for m in args.models.split(",") if m]
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    peak = cpu_peak()
    print(f"CPU: {peak['model']}; peak {peak['formula']}; load average {load_before}", flush=True)

    import jax

    import jaxbench

    want = max([int(d) for d in args.devices.split(",")], default=0) if args.devices else None
    jaxbench.use_cpu_devices(max(want, len(os.sched_getaffinity(0))) if want else None)
    jax.config.update("jax_enable_x64", True)
    from jaxbench.neighbors import neighbor_pairs
    from jaxbench.potential import model_card

    sys_data = [load_system(s, args.data_mirror) for s in systems]
    rows: list[dict] = []
    notes = []
    if "jaxbench" not in args.skip:
        for s in sys_data:
            for m in models:
                rows += jaxbench_rows(s, m, args, peak)
    import numpy as np

    from jaxbench import md

    hp = model_card("mace")["hyperparameters"]
    spec_systems = []
    for s in sys_data:
        p = md.load_protocol("egraffbench", s["name"])
        n_pairs = len(neighbor_pairs(np.asarray(s["positions"]), np.asarray(s["cell"]), np.asarray(s["pbc"]), float(hp["r_max"]))[0])
        spec_systems.append(dict(s, temperature_K=p.temperature_K, timestep_fs=p.timestep_fs,
                                 avg_num_neighbors=max(1.0, n_pairs / len(s["numbers"]))))
    spec_mlip = dict(hyperparameters=hp, steps=args.torch_steps, episodes=3, force_scale=args.force_scale)
    if "torch" not in args.skip and "mace" in models:
        spec = dict(hyperparameters=hp, systems=spec_systems, steps=args.torch_steps, warmup=3, force_scale=args.force_scale)
        got, err = run_subprocess(args.ref_python, "--torch-worker", spec, timeout=3600)
        rows += got
        if err:
            notes.append(f"mace-torch + ASE did not run: {err}")
            print(notes[-1])
    if "mlip" not in args.skip:
        if not Path(args.mlip_python).exists():
            notes.append(f"mlip: no interpreter at {args.mlip_python} (pip install mlip into its own venv)")
        else:
            got, err = run_subprocess(args.mlip_python, "--mlip-worker", dict(spec_mlip, systems=spec_systems), timeout=3600)
            rows += got
            if err:
                notes.append(f"mlip did not run: {err}")
        if notes and notes[-1].startswith("mlip"):
            print(notes[-1])
    header = dict(command="python benchmarks/md_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  cpu=peak, load_before=load_before, load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
                  dtype=args.dtype, notes=notes, python=platform.python_version())
    table = markdown(rows, header)
    print()
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, rows=rows), indent=1, default=str))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--torch-worker":
        torch_worker(json.loads(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "--mlip-worker":
        mlip_worker(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
