"""`jaxbench quickstart`, `jaxbench bench`, `jaxbench report` (the end-to-end commands)."""

from __future__ import annotations

import json
from pathlib import Path


def _x64():
    import jax

    jax.config.update("jax_enable_x64", True)  # MD integrates in float64 (the model may stay float32)


def cmd_quickstart(args) -> int:
    from .quickstart import quickstart, summary_table

    _x64()
    print(f"jaxbench quickstart -> {args.out} (LJ argon reference data, mace-small, 5 replicas; a few minutes)")
    r = quickstart(args.out, train_budget=args.train_budget, steps=args.steps, replicas=args.replicas,
                   seed=args.seed, progress=not args.quiet)
    print()
    print(summary_table(r))
    print(f"\nreport: {Path(args.out) / 'bench' / 'report.md'}   results: {Path(args.out) / 'bench' / 'results.json'}")
    print(f"total {r['quickstart_wall_s']:.0f} s. To reuse the generated dataset from the command line: "
          f"export JAXBENCH_CARDS={Path(args.out).resolve() / 'cards'}")
    return 0


def cmd_bench(args) -> int:
    from .bench import bench
    from .report import write_bench_report  # noqa: F401  (fail early if broken)

    _x64()
    oracle = None
    if args.oracle:
        from .runs import load_energy_model

        oracle = load_energy_model(args.oracle)
    from .errors import JaxbenchError

    if args.model is None and args.run is None:
        raise JaxbenchError("bench needs --model CARD (to train) or --run RUN (a trained run directory)")
    if args.task:
        from .tasks import run_task

        out = args.out or f"bench/{args.model or Path(args.run).name}-{args.task}"
        summary = run_task(args.task, args.model, out, run=args.run, train_budget=args.train_budget,
                           max_epochs=args.max_epochs, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                           replicas=args.replicas, steps=args.steps, seed=args.seed, dtype=args.dtype,
                           progress=not args.quiet, data_dir=args.data_dir)
        print(json.dumps(summary["groups"], indent=1))
        print(f"task summary: {Path(out) / 'task.json'}; per-run reports under {out}/")
        return 0
    if args.dataset is None:
        raise JaxbenchError("bench needs --dataset NAME (or --task NAME)")
    out = args.out or f"bench/{args.model or Path(args.run).name}-{args.dataset}"
    r = bench(args.model, args.dataset, out, run=args.run, train_budget=args.train_budget, max_epochs=args.max_epochs,
              n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, protocol=args.protocol or "egraffbench",
              replicas=args.replicas, steps=args.steps, temperature=args.temperature, timestep=args.timestep,
              oracle=oracle, seed=args.seed, dtype=args.dtype, progress=not args.quiet, data_dir=args.data_dir)
    from .report import markdown_table, tables

    for t in tables([r]).values():
        print(markdown_table(t))
    print(f"report: {Path(out) / 'report.md'}")
    return 0


def cmd_report(args) -> int:
    from .report import report

    res = report(args.benchmarks, out=args.out)
    print(res["markdown"])
    if args.out:
        print(f"written: {Path(args.out) / 'report.md'} and table1-4.csv")
    return 0


def add_commands(sub) -> None:
    pq = sub.add_parser("quickstart", help="the whole benchmark on generated Lennard-Jones argon data (no download)")
    pq.add_argument("--out", default="quickstart", help="output directory (default ./quickstart)")
    pq.add_argument("--train-budget", default="90s", help="training wall-clock budget (default 90s)")
    pq.add_argument("--steps", type=int, help="MD steps (default 500)")
    pq.add_argument("--replicas", type=int, help="replicas (default 5)")
    pq.add_argument("--seed", type=int, default=0)
    pq.add_argument("--quiet", action="store_true", help="no progress bars")
    pq.set_defaults(func=cmd_quickstart)

    pb = sub.add_parser("bench", help="train (or reuse a run), evaluate, simulate and score a model on a dataset")
    pb.add_argument("--model", help="model card (see `jaxbench models list`)")
    pb.add_argument("--dataset", help="dataset (see `jaxbench data list`)")
    pb.add_argument("--task", help="named out-of-distribution task instead of --dataset: 3bpa-600k, acac-600k, "
                                   "lips20-ood, md17-transfer-<a>-to-<b>")
    pb.add_argument("--run", help="reuse this trained run directory instead of training")
    pb.add_argument("--train-budget", default="60m", help="training wall-clock budget (default 60m)")
    pb.add_argument("--max-epochs", type=int)
    pb.add_argument("--n-train", type=int, help="only the first N training frames")
    pb.add_argument("--n-val", type=int, help="only the first N validation frames")
    pb.add_argument("--n-test", type=int, help="only the first N test frames for the error metrics")
    pb.add_argument("--protocol", help="protocol card in sims/ or a YAML path (default egraffbench)")
    pb.add_argument("--replicas", type=int, help="replicas (default: the protocol's, 5)")
    pb.add_argument("--steps", type=int, help="MD steps (default: the protocol's, 1000)")
    pb.add_argument("--temperature", type=float, help="K (default: the protocol's)")
    pb.add_argument("--timestep", type=float, help="fs (default: the protocol's)")
    pb.add_argument("--oracle", help="reference energy model 'module:attr' (e.g. jaxbench.quickstart:oracle) for EV/FV")
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="training dtype")
    pb.add_argument("--out", help="benchmark directory (default bench/<model>-<dataset>)")
    pb.add_argument("--data-dir", help="data directory")
    pb.add_argument("--quiet", action="store_true", help="no progress bars")
    pb.set_defaults(func=cmd_bench)

    pr = sub.add_parser("report", help="EGraFFBench-style Tables 1-4 over benchmark directories, beside the paper's values")
    pr.add_argument("benchmarks", nargs="+", help="directories written by `jaxbench bench` (or their results.json)")
    pr.add_argument("--out", help="write report.md and table1-4.csv here")
    pr.set_defaults(func=cmd_report)
