"""Run a command and line up its RSS over time with the lines it logs.

The script samples the summed RSS (anonymous and file-backed) of the command's process tree
every ``--interval`` seconds and stamps each line the command writes to stdout or stderr. It
prints the largest RSS samples, each with the line logged last before it. Run the merge
with ``--verbose`` so that it logs one line per tensor, for example, from benchmarks/work:

    ../../.venv/bin/python ../memory_timeline.py -- ../../.venv/bin/merge run ../ties.yml \\
        --output out/ours --force --verbose

The full timeline goes to ``--csv`` if given: seconds, RSS, anonymous RSS, file RSS and the
last line logged.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import _process_tree, _read_status  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.02, help="sampling period in seconds (default 0.02)")
    parser.add_argument("--top", type=int, default=15, help="how many of the largest samples to print")
    parser.add_argument("--csv", type=Path, help="write every sample to this CSV file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last_line = [""]
    lines: list[tuple[float, str]] = []

    def read_output() -> None:
        for line in process.stdout:
            stamp = time.perf_counter() - start
            last_line[0] = line.rstrip()
            lines.append((stamp, last_line[0]))

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    samples: list[tuple[float, int, int, int, str]] = []
    while process.poll() is None:
        total = [0, 0, 0]
        for pid in _process_tree(process.pid):
            for index, value in enumerate(_read_status(pid)):
                total[index] += value
        samples.append((time.perf_counter() - start, *total, last_line[0]))
        time.sleep(args.interval)
    reader.join()

    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["seconds", "rss_bytes", "anon_bytes", "file_bytes", "last_line"])
            writer.writerows(samples)

    print(f"exit code {process.returncode}, {time.perf_counter() - start:.1f} s, {len(samples)} samples")
    for stamp, text in lines[-3:]:
        print(f"  last output at {stamp:.1f} s: {text}")
    print(f"largest {args.top} RSS samples (GB: total / anonymous / file) and the line logged last before each:")
    for stamp, rss, anon, file_rss, text in sorted(samples, key=lambda s: -s[1])[: args.top]:
        print(f"  {stamp:7.2f} s  {rss / 1e9:5.2f} / {anon / 1e9:5.2f} / {file_rss / 1e9:5.2f}  {text[:120]}")
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
