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

    names = list(data.datasets()) if args.all else args.names
    if not names:
        print("jaxbench data fetch: name at least one dataset, or --all", file=sys.stderr)
        return 2
    for n in names:
        data.get(n)  # unknown names fail before anything is copied
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxbench", description=__import__("jaxbench").__doc__)
    p.add_argument("--version", action="version", version=f"jaxbench {__import__('jaxbench').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pd = sub.add_parser("data", help="reference datasets: list, fetch, verify")
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
    pm = sub.add_parser("models", help="model cards")
    msub = pm.add_subparsers(dest="models_command", required=True)
    pml = msub.add_parser("list", help="every model card with its hyperparameters and parameter count")
    pml.add_argument("--json", action="store_true", help="machine-readable output")
    pml.add_argument("--species", default="H,C,O", help="species the counts are for (default H,C,O)")
    pml.set_defaults(func=cmd_models_list)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except JaxbenchError as e:
        print(f"jaxbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
