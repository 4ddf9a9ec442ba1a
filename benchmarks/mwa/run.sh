#!/usr/bin/env bash
# Merge and score the MWA rows of docs/benchmarks.md: averages of the bench zoo's LoRA run on `sort`.
# Run from the repository root after `make install`; it builds the bench zoo first when needed.
set -euo pipefail
merge=.venv/bin/merge
"$merge" zoo build --size bench --quiet
score() {
    "$merge" eval "$1" --zoo build/zoo/bench --tasks sort --json \
        | .venv/bin/python -c 'import json, sys; accuracy = json.load(sys.stdin)["tasks"]["sort"]["accuracy"]
print(f"| {sys.argv[1]} | {accuracy:.3f} |")' "$2"
}
for step in 30 60 90 120 150 180 210 240 270 300; do
    score "build/zoo/bench/lm/lora-sort/checkpoint-$step" "checkpoint-$step"
done
for recipe in benchmarks/mwa/*.yaml; do
    name="$(basename "$recipe" .yaml)"
    "$merge" run "$recipe" --force -q
    score "build/merged/mwa/$name" "$name"
done
