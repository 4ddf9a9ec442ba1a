#!/usr/bin/env bash
# Benchmark mergekit_plus against mergekit on a 0.5B Llama TIES merge: speed, peak memory and
# output agreement. `make bench` calls it, and docs/benchmarks.md explains the setup and results.
#
# Steps, each skipped when its result is already there:
#   1. a check that the project venv .venv has `merge` (`make install` creates it);
#   2. mergekit in its own venv benchmarks/.venv-mergekit;
#   3. the checkpoints under benchmarks/work/ckpt (about 4 GB, built once);
#   4. timed runs of both tools (benchmarks/bench.py);
#   5. a tensor-by-tensor comparison of the two outputs (benchmarks/compare_outputs.py).
#
# Environment: PYTHON (interpreter for the mergekit venv, default python3), TORCH (torch
# requirement of that venv, default torch==2.13.0), MERGEKIT_VERSION (pins the mergekit release,
# default: the newest), BENCH_REPEATS (measured runs per tool, default 2).
set -euo pipefail

bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(dirname "$bench_dir")"
work="$bench_dir/work"
python="${PYTHON:-python3}"
# pip resolves a bare torch to a CUDA build of several GB. The mergekit venv gets the same
# pin as the project venv (the Makefile's TORCH), so both tools run the same torch build.
torch_pin="${TORCH:-torch==2.13.0}"

# 1. The project venv, which `make bench` creates through `make install`.
if [[ ! -x "$repo_root/.venv/bin/merge" ]]; then
    echo "bench: $repo_root/.venv/bin/merge not found; run 'make install' first, or 'make bench'" >&2
    exit 1
fi

# 2. mergekit in a venv of its own, so that its dependencies cannot change ours.
mergekit_venv="$bench_dir/.venv-mergekit"
if [[ ! -x "$mergekit_venv/bin/mergekit-yaml" ]]; then
    echo "bench: installing mergekit into $mergekit_venv"
    "$python" -m venv "$mergekit_venv"
    # torch goes first, so that mergekit's torch requirement is already met.
    "$mergekit_venv/bin/pip" install --quiet "$torch_pin"
    "$mergekit_venv/bin/pip" install --quiet "mergekit${MERGEKIT_VERSION:+==$MERGEKIT_VERSION}"
fi

# 3. The checkpoints. The builder returns at once when they are up to date.
"$repo_root/.venv/bin/python" "$bench_dir/build_checkpoints.py" "$work/ckpt"

# 4. Timing and peak memory.
"$repo_root/.venv/bin/python" "$bench_dir/bench.py" --work "$work" --repeats "${BENCH_REPEATS:-2}"

# 5. Agreement of the outputs of the last round.
echo
echo "bench: comparing $work/out/mergekit with $work/out/ours"
"$repo_root/.venv/bin/python" "$bench_dir/compare_outputs.py" "$work/out/mergekit" "$work/out/ours" \
    --inputs "$work/ckpt/base" "$work/ckpt/ft1" "$work/ckpt/ft2" "$work/ckpt/ft3" --density 0.2 \
    --json "$work/comparison.json"
