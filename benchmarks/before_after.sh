#!/usr/bin/env bash
# MD and training throughput of an earlier commit beside the working tree, alternated (before, after) x ROUNDS,
# so that machine noise hits both sides alike. Usage: benchmarks/before_after.sh <commit> [rounds]
# Needs JAXBENCH_DATA_MIRROR. Prints the tables of every run; compare the rows side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${1:?baseline commit}"; rounds="${2:-2}"
wt="$(mktemp -d)/baseline"
git worktree add --detach "$wt" "$base" >/dev/null
trap 'git worktree remove --force "$wt"' EXIT
for r in $(seq "$rounds"); do
  for side in before after; do
    if [ "$side" = before ]; then pp="$wt"; b="$wt/benchmarks"; else pp="$PWD"; b=benchmarks; fi
    echo "=== md $side $r $(date +%T)"
    PYTHONPATH="$pp" .venv/bin/python "$b/md_throughput.py" --systems md17-ethanol,lips --models mace --steps 50 \
      --skip torch,mlip --devices 1 2>/dev/null | grep '^| [a-z]'
    echo "=== train $side $r $(date +%T)"
    PYTHONPATH="$pp" .venv/bin/python "$b/train_throughput.py" --steps 10 --warmup 2 2>/dev/null | grep '^| [a-z]' || true
  done
done
