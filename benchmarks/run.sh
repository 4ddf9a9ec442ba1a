#!/usr/bin/env bash
# Benchmark mergekit_plus against mergekit and FusionBench on a 0.5B Llama TIES merge: speed, peak
# memory and output agreement. `make bench` calls it, and docs/benchmarks.md explains the setup
# and results.
#
# Steps, each skipped when its result is already there:
#   1. a check that the project venv .venv has `merge` (`make install` creates it);
#   2. mergekit in its own venv benchmarks/.venv-mergekit, and FusionBench in
#      benchmarks/.venv-fusionbench;
#   3. the checkpoints under benchmarks/work/ckpt (about 4 GB, built once), and a 0.044B set
#      of the same width under benchmarks/work/small/ckpt (0.3 GB) on which FusionBench fits;
#   4. timed runs of every tool on both sets (benchmarks/bench.py). A run is stopped when its
#      RSS passes the memory cap, as FusionBench's is on the 0.5B set;
#   5. tensor-by-tensor comparisons of the outputs (benchmarks/compare_outputs.py): mergekit
#      against ours, and FusionBench against ours with `scope: model`.
#
# Environment: PYTHON (interpreter for the tool venvs, default python3), TORCH (torch
# requirement of those venvs, default torch==2.13.0), MERGEKIT_VERSION and FUSIONBENCH_VERSION
# (pin the releases, default: the newest), BENCH_REPEATS (measured runs per tool, default 2),
# BENCH_MEMORY_CAP_GB (RSS at which a run is stopped, default 70% of the machine's memory).
# Arguments go to bench.py, for example `--quiet-timeout 10 --max-retries 0` on a busy machine.
set -euo pipefail

bench_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(dirname "$bench_dir")"
work="$bench_dir/work"
python="${PYTHON:-python3}"
# pip resolves a bare torch to a CUDA build of several GB. The tool venvs get the same pin as
# the project venv (the Makefile's TORCH), so every tool runs the same torch build.
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

# FusionBench with all its dependencies. Its TIES module imports the package root, which pulls
# in transformers, accelerate, datasets, hydra, omegaconf, lightning, peft and bidict, so a
# --no-deps install with a hand-kept list saves only 0.3 GB of the 1.8 GB (fusion-bench 0.2.33).
fusionbench_venv="$bench_dir/.venv-fusionbench"
if [[ ! -x "$fusionbench_venv/bin/python" ]] || ! "$fusionbench_venv/bin/python" -c "import fusion_bench" 2>/dev/null; then
    echo "bench: installing fusion-bench into $fusionbench_venv"
    "$python" -m venv "$fusionbench_venv"
    "$fusionbench_venv/bin/pip" install --quiet "$torch_pin"
    "$fusionbench_venv/bin/pip" install --quiet "fusion-bench${FUSIONBENCH_VERSION:+==$FUSIONBENCH_VERSION}"
fi

# 3. The checkpoints. The builder returns at once when they are up to date. The small set keeps
# the width and drops to 2 layers and 8000 tokens, so FusionBench's in-memory merge of it needs
# about 6 GB instead of an estimated 63 GB.
small="$work/small"
"$repo_root/.venv/bin/python" "$bench_dir/build_checkpoints.py" "$work/ckpt"
"$repo_root/.venv/bin/python" "$bench_dir/build_checkpoints.py" "$small/ckpt" --layers 2 --vocab-size 8000

# 4. Timing and peak memory.
for folder in "$work" "$small"; do
    echo
    echo "bench: timing the tools on $folder/ckpt"
    "$repo_root/.venv/bin/python" "$bench_dir/bench.py" --work "$folder" --repeats "${BENCH_REPEATS:-2}" "$@"
done

# 5. Agreement of the outputs of the last round. FusionBench's output is missing where the
# memory cap stopped it.
compare() {
    local folder="$1" left="$2" right="$3" scope="$4" json="$5"
    if [[ ! -d "$folder/out/$left" ]]; then
        echo "bench: no output of $left in $folder/out, so it is not compared"
        return
    fi
    echo
    echo "bench: comparing $folder/out/$left with $folder/out/$right"
    "$repo_root/.venv/bin/python" "$bench_dir/compare_outputs.py" "$folder/out/$left" "$folder/out/$right" \
        --inputs "$folder/ckpt/base" "$folder/ckpt/ft1" "$folder/ckpt/ft2" "$folder/ckpt/ft3" --density 0.2 \
        --scope "$scope" --json "$folder/$json"
}
compare "$work" mergekit ours tensor comparison.json
compare "$work" fusionbench ours-model-scope model comparison-fusionbench.json
compare "$small" fusionbench ours-model-scope model comparison-fusionbench.json
