#!/usr/bin/env bash
# Merge and score the Frank-Wolfe rows of docs/benchmarks.md on the bench zoo. Run from the
# repository root after `make install`; it builds the bench zoo first when needed (about 15 minutes).
# Each recipe is merged with `merge run` and scored on the four tasks that have data.
set -euo pipefail
merge=.venv/bin/merge
tasks=first_last,next_letters,vowels,last_two
"$merge" zoo build --size bench --quiet
for recipe in benchmarks/frank_wolfe/*.yaml; do
    name="$(basename "$recipe" .yaml)"
    start=$(date +%s)
    "$merge" run "$recipe" --force -q
    seconds=$(( $(date +%s) - start ))
    "$merge" eval "build/merged/fw/$name" --zoo build/zoo/bench --tasks "$tasks" --json \
        | .venv/bin/python -c 'import json, sys
report = json.load(sys.stdin)
cells = " | ".join(f"{task['"'"'normalized'"'"']:.3f}" for task in report["tasks"].values())
print(f"| {sys.argv[1]} | {cells} | {report['"'"'average'"'"']['"'"'normalized'"'"']:.3f} | {sys.argv[2]} s |")' "$name" "$seconds"
done
