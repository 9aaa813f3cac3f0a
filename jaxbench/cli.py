"""The `jaxbench` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import JaxbenchError


def _fmt_list(v):
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def cmd_data_list(args) -> int:
    from . import data

    rows = data.dataset_table(args.data_dir, hash_files=not args.no_verify)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    root = data.resolve_data_dir(args.data_dir)
    print(f"data directory: {root}")
    header = f"{'dataset':<24} {'frames (split=n)':<44} {'atoms':<8} {'elements':<10} {'periodic':<8} {'T/K':<8} {'dt/fs':<6} status"
    print(header)
    print("-" * len(header))
    for r in rows:
        frames = " ".join(f"{k}={v}" for k, v in r["frames"].items())
        atoms = _fmt_list(r["atoms"]) if len(r["atoms"]) <= 3 else f"{min(r['atoms'])}-{max(r['atoms'])}"
        status = "verified" if r["verified"] else ("present" if r["present"] else "missing")
        if r["present"] and r["verified"] is False:
            status = "CHECKSUM MISMATCH"
        print(
            f"{r['name']:<24} {frames:<44} {atoms:<8} {_fmt_list(r['elements']):<10} {str(r['periodic']).lower():<8} "
            f"{_fmt_list(r['temperature_K']):<8} {_fmt_list(r['timestep_fs']):<6} {status}"
        )
    return 0


def cmd_data_fetch(args) -> int:
    from . import data

    names = list(data.datasets(args.data_dir)) if args.all else args.names
    if not names:
        print("jaxbench data fetch: name at least one dataset, or --all", file=sys.stderr)
        return 2
    for n in names:
        data.get(n, args.data_dir)  # unknown names fail before anything is copied
    root = data.resolve_data_dir(args.data_dir)
    mirror = data.resolve_mirror(args.mirror)
    print(f"fetching {len(names)} dataset(s) into {root} from {mirror if mirror else 'upstream URLs'}")
    res = data.fetch(names, args.data_dir, mirror=args.mirror, base_url=args.base_url, progress=not args.quiet)
    print(f"{len(res)} files present and verified")
    return 0


def cmd_data_verify(args) -> int:
    from . import data

    names = args.names or None
    res = data.verify(names, args.data_dir)
    bad = [r for r in res if r.state == "mismatch"]
    ok = [r for r in res if r.state == "ok"]
    missing = [r for r in res if r.state == "missing"]
    for r in bad:
        print(f"MISMATCH {r.path}: sha256 {r.actual}, card says {r.sha256}")
    if args.strict:
        for r in missing:
            print(f"MISSING  {r.path}")
    print(f"{len(ok)} ok, {len(bad)} mismatched, {len(missing)} not present ({data.resolve_data_dir(args.data_dir)})")
    if bad or (args.strict and missing) or not ok:
        return 1
    return 0


def cmd_models_list(args) -> int:
    from ase.data import atomic_numbers

    from .potential import count_parameters, model_cards

    species = tuple(atomic_numbers[s] for s in args.species.split(","))
    rows = []
    for name, card in model_cards().items():
        row = dict(
            name=name,
            architecture=card["architecture"],
            title=card.get("title", ""),
            variant_of=card.get("variant_of"),
            hyperparameters=card.get("hyperparameters", {}),
            training=card.get("training", {}),
            reference=card.get("reference", ""),
        )
        try:
            row["parameters"] = count_parameters(card, species)
        except Exception as e:  # a broken card must not hide the others
            row["parameters"] = None
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    if args.json:
        print(json.dumps(dict(species=args.species.split(","), models=rows), indent=2, default=str))
        return 0
    print(f"parameter counts for {len(species)} species ({args.species})")
    for r in rows:
        count = f"{r['parameters']:,}" if r["parameters"] is not None else f"ERROR {r['error']}"
        print(f"\n{r['name']}  [{r['architecture']}]  {count} parameters  {r['title']}")
        hp = ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items())
        print(f"  hyperparameters: {hp}")
        if r["training"] and not r["variant_of"]:
            tr = ", ".join(f"{k}={v}" for k, v in r["training"].items())
            print(f"  training: {tr}")
    return 0 if all(r["parameters"] is not None for r in rows) else 1


def cmd_train(args) -> int:
    if args.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    from .train import TrainingDivergedError, train

    try:
        summary = train(
            model=args.model, dataset=args.dataset,
            budget=args.budget if args.budget is not None else (None if args.resume else "60m"), max_epochs=args.max_epochs, seed=args.seed,
            out=args.out, resume=args.resume, dtype=args.dtype, n_train=args.n_train, n_val=args.n_val,
            checkpoint_every=args.checkpoint_every, progress=not args.quiet,
            pause_after_checkpoint=args.pause_after_checkpoint, devices=args.devices,
            swa_on_budget=args.swa_start != "epochs", data_dir=args.data_dir,
        )
    except TrainingDivergedError as e:
        print(f"jaxbench: training diverged: {e}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate

    res = evaluate(args.run, dataset=args.dataset, split=args.split, which=args.which, n_frames=args.n_frames,
                   batch_size=args.batch_size, plots=not args.no_plots, data_dir=args.data_dir)
    print(json.dumps(res["metrics"], indent=2))
    print(f"results: {res['results_path']}")
    return 0


def _rdf_stability_hook(spec, protocol, start, args):
    """FaNE eq. 8 in the MD engine, against the dataset's frames at the protocol's temperature."""
    from .errors import JaxbenchError
    from .reference import reference_frames, reference_split
    from .scoring import BenchSettings, rdf_failure_hook

    if not spec.periodic:
        raise JaxbenchError(f"--rdf-stability: dataset '{spec.name}' is not periodic (molecules use the bond criterion, "
                            "which is always on)")
    split = reference_split(spec.name, protocol)
    if split is None:
        raise JaxbenchError(f"--rdf-stability: dataset '{spec.name}' has no reference frames at {protocol.temperature_K:g} K")
    ref_pos, ref_cells = reference_frames(spec.name, split, start.n_atoms, args.data_dir)
    if ref_pos is None:
        raise JaxbenchError(f"--rdf-stability: the frames of '{spec.name}' split '{split}' do not all have the simulated atoms")
    settings = BenchSettings(rdf_stability_window_fs=args.rdf_window_fs, rdf_stability_threshold=args.rdf_threshold)
    hook, window = rdf_failure_hook(start, ref_pos, ref_cells, protocol, settings)
    if hook is None:
        raise JaxbenchError(f"--rdf-stability: {window}")
    return hook


def cmd_simulate(args) -> int:
    from pathlib import Path

    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    from . import data, md
    from .errors import JaxbenchError
    from .runs import load_energy_model

    spec = data.get(args.dataset, data_dir=args.data_dir)
    protocol = md.load_protocol(args.protocol or "egraffbench", dataset=spec.name)
    protocol = protocol.replace(
        replicas=args.replicas, steps=args.steps, temperature_K=args.temperature, timestep_fs=args.timestep,
        ensemble=args.ensemble,
    )
    if args.steps is not None and protocol.steps % protocol.save_every:
        protocol = protocol.replace(save_every=int(np.gcd(protocol.steps, protocol.save_every)))
    if protocol.chunk_steps % protocol.save_every:
        protocol = protocol.replace(chunk_steps=protocol.save_every)
    protocol.validate()
    if args.out:
        out_dir = Path(args.out)
    elif Path(args.run).is_dir():
        out_dir = Path(args.run) / "md" / f"{protocol.name}_{spec.name}"
    else:
        out_dir = Path(f"md_{protocol.name}_{spec.name}")
    traj = out_dir / "trajectory.h5"
    if traj.exists() and not args.overwrite and not args.resume:
        raise JaxbenchError(f"output {traj} exists; refusing to overwrite it (pass --overwrite, or --resume to continue it)")
    model = load_energy_model(args.run)
    frames = data.load(spec.name, protocol.frame_split, data_dir=args.data_dir)
    start = md.start_from_frames(frames, protocol.replicas, protocol.replica_init)
    hook = None
    if args.rdf_stability:
        hook = _rdf_stability_hook(spec, protocol, start, args)
    print(
        f"simulate {model.name} on {spec.name}: {protocol.ensemble} {protocol.temperature_K} K, {protocol.timestep_fs} fs x "
        f"{protocol.steps} steps, {start.n_replicas} replicas of {start.n_atoms} atoms (frames {list(start.frame_indices)}) -> {traj}"
    )
    res = md.simulate(
        model, start, protocol, seed=args.seed, out=traj, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet,
        batch=args.batch, devices=args.devices, metadata=dict(run=str(args.run), dataset=spec.name), failure_fn=hook,
    )
    summary = dict(
        dataset=spec.name, run=str(args.run), model=model.name, protocol=protocol.to_dict(), seed=args.seed,
        steps_done=res.steps_done, failed=res.failed.tolist(), failure_step=res.failure_step.tolist(),
        failure_time_fs=[None if np.isnan(t) else float(t) for t in res.failure_time_fs],
        failure_reason=[md.describe_failure(r) for r in res.failure_reason], timings=res.timings,
        neighbor_reallocations=res.n_reallocations, trajectory=str(traj),
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(res.summary())
    print(f"wrote {traj} and {out_dir / 'summary.json'} ({res.timings['total_s']:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxbench", description=__import__("jaxbench").__doc__)
    p.add_argument("--version", action="version", version=f"jaxbench {__import__('jaxbench').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pd = sub.add_parser("data", help="reference datasets: list, fetch, verify, generate")
    dsub = pd.add_subparsers(dest="data_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="data directory (default: $JAXBENCH_DATA_DIR or a per-user cache directory)")

    pl = dsub.add_parser("list", parents=[common], help="every dataset with frames, atoms, elements and status")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument("--no-verify", action="store_true", help="check presence only, skip hashing")
    pl.set_defaults(func=cmd_data_list)

    pf = dsub.add_parser("fetch", parents=[common], help="download or copy datasets, verifying sha256")
    pf.add_argument("names", nargs="*", help="dataset names (see `jaxbench data list`)")
    pf.add_argument("--all", action="store_true", help="every dataset")
    pf.add_argument("--mirror", help="local directory laid out like upstream (default: $JAXBENCH_DATA_MIRROR)")
    pf.add_argument("--base-url", help="HTTP(S) prefix to fetch <prefix>/<path> from instead of the card's URL")
    pf.add_argument("--quiet", action="store_true", help="no progress bar")
    pf.set_defaults(func=cmd_data_fetch)

    pv = dsub.add_parser("verify", parents=[common], help="re-check the sha256 of every present file")
    pv.add_argument("names", nargs="*", help="restrict to these datasets")
    pv.add_argument("--strict", action="store_true", help="also fail when a dataset's files are missing")
    pv.set_defaults(func=cmd_data_verify)
    from . import generate as _gen

    pg = dsub.add_parser("generate", help="generate a dataset with a reference engine (OpenMM, ASE EMT): frames + card")
    _gen.add_arguments(pg)
    pg.set_defaults(func=_gen.run)
    pm = sub.add_parser("models", help="model cards")
    msub = pm.add_subparsers(dest="models_command", required=True)
    pml = msub.add_parser("list", help="every model card with its hyperparameters and parameter count")
    pml.add_argument("--json", action="store_true", help="machine-readable output")
    pml.add_argument("--species", default="H,C,O", help="species the counts are for (default H,C,O)")
    pml.set_defaults(func=cmd_models_list)

    psim = sub.add_parser("simulate", parents=[common], help="MD with a trained run (or a Python energy model) on a dataset")
    psim.add_argument("run", help="trained run directory, or 'module:attr' (EnergyModel / factory, e.g. jaxbench.md:morse)")
    psim.add_argument("--dataset", required=True, help="dataset name (start frames from its protocol split)")
    psim.add_argument("--protocol", help="protocol card name in sims/ or a YAML path (default: egraffbench)")
    psim.add_argument("--replicas", type=int, help="number of replicas (default: the card's)")
    psim.add_argument("--steps", type=int, help="MD steps (default: the card's)")
    psim.add_argument("--temperature", type=float, help="temperature in K (default: the card's)")
    psim.add_argument("--timestep", type=float, help="timestep in fs (default: the card's)")
    psim.add_argument("--ensemble", choices=["nve", "nvt_langevin", "nvt_nose_hoover"], help="override the card's ensemble")
    psim.add_argument("--seed", type=int, default=0, help="velocity / noise seed (default 0)")
    psim.add_argument("--batch", choices=["map", "vmap", "vmap_select"], default="map", help="replica batching (default map: measured fastest)")
    psim.add_argument("--devices", type=int, help="split the replicas over this many devices (default: all, one per CPU core)")
    psim.add_argument("--rdf-stability", action="store_true",
                      help="periodic systems: stop a replica whose RDF over a window deviates from the dataset's "
                           "(FaNE eq. 8; the bond criterion for molecules is always on)")
    psim.add_argument("--rdf-window-fs", type=float, default=1000.0, help="RDF criterion window in fs (default 1000)")
    psim.add_argument("--rdf-threshold", type=float, default=1.0, help="RDF criterion Delta, integrated |g - g_ref| (default 1.0)")
    psim.add_argument("--out", help="output directory (trajectory.h5 + summary.json)")
    psim.add_argument("--overwrite", action="store_true", help="replace an existing trajectory")
    psim.add_argument("--resume", action="store_true",
                      help="continue the trajectory in --out from its last committed chunk (bit-identical to an "
                           "uninterrupted run; same arguments as the first call)")
    psim.add_argument("--quiet", action="store_true", help="no progress bar")
    psim.set_defaults(func=cmd_simulate)

    pt = sub.add_parser("train", parents=[common], help="train a model card on a dataset (resumable run directory)")
    pt.add_argument("--model", help="model card (see `jaxbench models list`); optional with --resume")
    pt.add_argument("--dataset", help="dataset (see `jaxbench data list`); optional with --resume")
    pt.add_argument("--budget", default=None, help="wall-clock budget, e.g. 60m, 2h (default 60m; with --resume: the run's)")
    pt.add_argument("--max-epochs", type=int, help="epochs (default: the card's max_epochs)")
    pt.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    pt.add_argument("--out", help="run directory (default runs/<model>-<dataset>-s<seed>)")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out from its last good checkpoint")
    pt.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    pt.add_argument("--n-train", type=int, help="use only the first N training frames")
    pt.add_argument("--n-val", type=int, help="use only the first N validation frames")
    pt.add_argument("--checkpoint-every", type=int, help="also checkpoint `last` every N steps inside an epoch")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.add_argument("--devices", type=int, help="split each batch over this many devices (default: all, one per CPU core)")
    pt.add_argument("--swa-start", choices=["budget", "epochs"], default="budget",
                    help="with a budget, the card's second phase (SWA) starts at its fraction of the budget (default) "
                         "or only at its fraction of max_epochs (the card's schedule, cut where the budget ends); "
                         "a resumed run keeps its own choice")
    pt.add_argument("--pause-after-checkpoint", type=float, default=0.0, help=argparse.SUPPRESS)  # tests
    pt.set_defaults(func=cmd_train)

    pe = sub.add_parser("evaluate", parents=[common], help="errors of a trained run on a dataset split: results.json + parity plots")
    pe.add_argument("run", help="run directory written by `jaxbench train`")
    pe.add_argument("--dataset", help="dataset (default: the run's)")
    pe.add_argument("--split", default="test")
    pe.add_argument("--which", default="best", choices=["best", "last"])
    pe.add_argument("--n-frames", type=int, help="only the first N frames of the split")
    pe.add_argument("--batch-size", type=int, help="frames per evaluation batch (default: the card's valid_batch_size)")
    pe.add_argument("--no-plots", action="store_true")
    pe.set_defaults(func=cmd_evaluate)
    from .cli_bench import add_commands

    add_commands(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("simulate", "train", "evaluate", "quickstart", "bench"):
        from . import use_cpu_devices

        use_cpu_devices()  # one XLA device per core: replicas / batch parts run one share per core
    from .errors import Interrupted

    try:
        return int(args.func(args) or 0)
    except Interrupted as e:
        print(f"jaxbench: interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except JaxbenchError as e:
        print(f"jaxbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
