"""Time the same TIES merge with mergekit, mergekit_plus and FusionBench, and record peak memory.

Each run starts with the input checkpoints in the page cache (every input file is read once
just before the run) and with no output folder, so both tools do the same I/O. The tools
alternate, mergekit first, for ``--repeats`` rounds. A run's wall time is measured around the
subprocess. Its peak RSS is the larger of two readings. One is the kernel's high-water mark
for the process (``ru_maxrss`` from ``wait4``). The other is the largest sum of VmRSS over
the process tree, sampled from /proc every 50 ms, which also catches tools that fork
workers. RSS includes
file-backed pages, such as memory-mapped input shards, as well as anonymous memory. The
sampler records both kinds at the peak so the split can be reported.

A watchdog stops a run whose process tree grows past ``--memory-cap-gb`` of RSS (by default
the environment variable BENCH_MEMORY_CAP_GB, else 70% of the machine's memory), or during
which the machine's available memory falls under ``--min-available-gb``. It kills the run's
process group, deletes its partial output and reports the run as stopped at the RSS it had
reached, and the tool is not run again in later rounds. FusionBench's in-memory TIES needs
this: at its peak it holds about 125 bytes per parameter in float32 (measured on Llamas of
0.015B and 0.044B parameters), so the 0.5B checkpoints would take an estimated 63 GB. Every run also
starts with an OOM score adjustment of 1000, so if memory still runs out the kernel kills the
benchmark first.

The machine may be shared, so before each run the script waits until the CPUs have been
nearly idle for a few seconds. For each run it records the CPU time that other processes
used meanwhile: the machine-wide busy time from /proc/stat minus the run's own user and
system time. A run with more than ``--max-foreign-cpu`` of that per second of wall
time is repeated, up to ``--max-retries`` times, and marked as contended in the results if
it never ran clean.

The script uses only the standard library and runs on Linux. Results go to
``results.json`` in the work folder and a table to standard output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RECIPE = BENCH_DIR / "ties.yml"
# The same merge with the whole-model trim, which reads the inputs up to three times.
# FusionBench runs it too, through fusionbench_ties.py, since its TIES only trims whole models.
MODEL_SCOPE_RECIPE = BENCH_DIR / "ties-model-scope.yml"
FUSIONBENCH_SCRIPT = BENCH_DIR / "fusionbench_ties.py"
TOOLS = ("mergekit", "ours", "ours-model-scope", "fusionbench")
SAMPLE_INTERVAL_S = 0.05
DEFAULT_CAP_SHARE = 0.7

# mergekit flags, chosen as a user who knows mergekit would run it on a CPU-only machine.
# There is no --cuda because there is no GPU, and --device defaults to cpu. There is no
# --async-write, which keeps finished shards in memory while a thread writes them. The
# default 5B --out-shard-size matches our default shard size, and a smaller one did not lower
# mergekit's peak RSS. --lazy-unpickle only changes how .bin files are read, so it is a no-op
# on these safetensors inputs, but users who care about memory pass it. --quiet drops the
# progress bars, as --quiet does for ours.
MERGEKIT_FLAGS = ["--lazy-unpickle", "--quiet"]
OURS_FLAGS = ["--force", "--quiet"]


@dataclass
class RunResult:
    tool: str
    round: int
    wall_s: float
    peak_rss_bytes: int
    ru_maxrss_bytes: int
    sampled_peak_rss_bytes: int
    sampled_anon_at_peak_bytes: int
    sampled_file_at_peak_bytes: int
    returncode: int
    cpu_s: float = 0.0
    foreign_cpu_s: float = 0.0
    contended: bool = False
    # Why the watchdog killed the run ("cap" or "machine memory low"), or None.
    stopped: str | None = None
    log_tail: str = ""


@dataclass
class Summary:
    tool: str
    # None when the watchdog stopped every run of the tool.
    best_wall_s: float | None
    max_peak_rss_bytes: int
    # Why the watchdog stopped the tool's runs, set only when no run finished.
    stopped: str | None = None
    runs: list[RunResult] = field(default_factory=list)


def _read_status(pid: int) -> tuple[int, int, int]:
    """Return (VmRSS, RssAnon, RssFile) of one process in bytes, zeros if it has exited."""
    values = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values["VmRSS"], values["RssAnon"], values["RssFile"]


def _process_tree(root: int) -> list[int]:
    """Return the pid of root and of all its live descendants, found through /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                text = stat.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # The command name in brackets may contain spaces, so the fields after it are split.
        fields = text[text.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def mem_available_bytes() -> int:
    """Return the kernel's estimate of the memory available to new work, MemAvailable."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def mem_total_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        return int(meminfo.readline().split()[1]) * 1024


class RssSampler(threading.Thread):
    """Sample the summed RSS of a process tree until stopped, keeping the peak.

    When `cap_bytes` is set, the sampler also kills the tree's process group with SIGKILL once
    its RSS exceeds the cap or the machine's MemAvailable falls under `min_available_bytes`,
    and records why in `stopped`. A sample is taken every 50 ms, so the RSS may overshoot the
    cap by what the tree allocates in that time.
    """

    def __init__(self, root_pid: int, *, cap_bytes: int | None = None, min_available_bytes: int = 0) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.cap_bytes = cap_bytes
        self.min_available_bytes = min_available_bytes
        self.peak = (0, 0, 0)
        self.stopped: str | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            total = [0, 0, 0]
            for pid in _process_tree(self.root_pid):
                for index, value in enumerate(_read_status(pid)):
                    total[index] += value
            if total[0] > self.peak[0]:
                self.peak = tuple(total)
            if self.cap_bytes is not None and self.stopped is None:
                if total[0] > self.cap_bytes:
                    self._kill("cap")
                elif mem_available_bytes() < self.min_available_bytes:
                    self._kill("machine memory low")
            self._stop_event.wait(SAMPLE_INTERVAL_S)

    def _kill(self, reason: str) -> None:
        self.stopped = reason
        try:
            # The run leads its own session, so its process group contains the whole tree.
            os.killpg(self.root_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def machine_busy_seconds() -> float:
    """Return the CPU seconds all processes have spent busy since boot, summed over cores."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # The fields are user, nice, system, idle, iowait, irq, softirq, steal, guest and
    # guest_nice. Guest time is already counted in user, so only the first eight are summed.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(*, max_load: float, window_s: float, timeout_s: float) -> float:
    """Wait until the machine uses under `max_load` cores over `window_s`, and return the last load.

    After `timeout_s` the function returns whatever the load is.
    """
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        before = machine_busy_seconds()
        time.sleep(window_s)
        load = (machine_busy_seconds() - before) / window_s
        if load <= max_load or time.monotonic() > deadline:
            return load
        if not announced:
            print(f"waiting for the machine to go quiet (other processes use {load:.2f} cores)", flush=True)
            announced = True


def warm_page_cache(folders: list[Path]) -> None:
    """Read every file under the folders once, so that no run pays for cold disk reads."""
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                with open(path, "rb") as handle:
                    while handle.read(64 << 20):
                        pass


def _raise_oom_score() -> None:
    """Make the kernel's OOM killer pick this process, and what it starts, before any other."""
    with open("/proc/self/oom_score_adj", "w", encoding="ascii") as score:
        score.write("1000")


def run_measured(tool: str, round_index: int, command: list[str], *, cwd: Path, env: dict,
                 cap_bytes: int | None = None, min_available_bytes: int = 0) -> RunResult:
    """Run one command, returning its wall time and peak RSS, and stop it at the memory cap."""
    log_path = cwd / f"{tool}.log"
    with open(log_path, "wb") as log:
        busy_before = machine_busy_seconds()
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=_raise_oom_score)
        sampler = RssSampler(process.pid, cap_bytes=cap_bytes, min_available_bytes=min_available_bytes)
        sampler.start()
        # wait4 returns this child's own rusage; ru_maxrss is in KiB on Linux.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        busy = machine_busy_seconds() - busy_before
        sampler.stop()
    process.returncode = os.waitstatus_to_exitcode(status)
    log_tail = log_path.read_text(errors="replace")[-2000:]
    sampled_rss, sampled_anon, sampled_file = sampler.peak
    ru_maxrss = usage.ru_maxrss * 1024
    cpu = usage.ru_utime + usage.ru_stime
    return RunResult(
        tool=tool,
        round=round_index,
        wall_s=wall,
        peak_rss_bytes=max(ru_maxrss, sampled_rss),
        ru_maxrss_bytes=ru_maxrss,
        sampled_peak_rss_bytes=sampled_rss,
        sampled_anon_at_peak_bytes=sampled_anon,
        sampled_file_at_peak_bytes=sampled_file,
        returncode=process.returncode,
        cpu_s=cpu,
        foreign_cpu_s=max(0.0, busy - cpu),
        stopped=sampler.stopped,
        log_tail=log_tail,
    )


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True).stdout.strip()


def tool_versions(mergekit_python: Path, ours_python: Path, fusionbench_python: Path) -> dict[str, str]:
    def query(python: Path, code: str) -> str:
        if not python.exists():
            return f"not installed ({python} not found)"
        result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
        return result.stdout.strip() or f"unknown ({result.stderr.strip().splitlines()[-1:]})"

    def probe(*packages: str) -> str:
        return f"import importlib.metadata as m; print(' '.join(p + '==' + m.version(p) for p in {packages!r}))"

    return {
        "mergekit": query(mergekit_python, probe("mergekit", "torch", "safetensors", "transformers")),
        "ours": query(ours_python, probe("mergekit_plus", "torch", "safetensors")),
        "fusionbench": query(fusionbench_python, probe("fusion-bench", "torch", "safetensors", "transformers")),
        "ours_commit": _git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes under mergekit_plus/ mean the numbers are not those of the commit.
        "ours_uncommitted_changes": bool(_git("status", "--porcelain", "--", "mergekit_plus")),
        "python": platform.python_version(),
    }


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gib": f"{mem_total_bytes() / 2**30:.1f}",
        "kernel": platform.release(),
        "date": datetime.date.today().isoformat(),
    }


def _ratio(numerator: Summary, denominator: Summary) -> tuple[str, str]:
    """Return the wall-time and peak-RSS ratios of two tools as table cells.

    A stopped tool has no time. Its true peak is above the RSS at which it was stopped, so its
    RSS ratio is a lower bound when it is the numerator and an upper bound when it is the
    denominator.
    """
    if numerator.stopped and denominator.stopped:
        return "-", "-"
    rss = f"{numerator.max_peak_rss_bytes / denominator.max_peak_rss_bytes:.2f}x"
    if numerator.stopped:
        return "-", "> " + rss
    if denominator.stopped:
        return "-", "< " + rss
    return f"{numerator.best_wall_s / denominator.best_wall_s:.2f}x", rss


# Ratio rows, numerator first: each pairs tools that run the same merge, or a tool with its variant.
RATIO_ROWS = (("ours", "mergekit"), ("ours-model-scope", "ours"), ("ours-model-scope", "fusionbench"))


def format_table(summaries: dict[str, Summary]) -> str:
    lines = [
        "| tool | wall s (best) | peak RSS GB (max) | CPU s (best run) | runs | contended runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for summary in summaries.values():
        contended = sum(run.contended for run in summary.runs)
        if summary.stopped:
            run = summary.runs[-1]
            lines.append(
                f"| {summary.tool} | stopped at {summary.max_peak_rss_bytes / 1e9:.1f} GB ({summary.stopped}) "
                f"| > {summary.max_peak_rss_bytes / 1e9:.2f} | {run.cpu_s:.1f} until stopped | {len(summary.runs)} "
                f"| {contended} |"
            )
            continue
        best = min(summary.runs, key=lambda run: run.wall_s)
        lines.append(
            f"| {summary.tool} | {summary.best_wall_s:.1f} | {summary.max_peak_rss_bytes / 1e9:.2f} "
            f"| {best.cpu_s:.1f} | {len(summary.runs)} | {contended} |"
        )
    for numerator, denominator in RATIO_ROWS:
        if numerator in summaries and denominator in summaries:
            wall, rss = _ratio(summaries[numerator], summaries[denominator])
            lines.append(f"| {numerator} / {denominator} | {wall} | {rss} | | | |")
    return "\n".join(lines)


def default_memory_cap_gb() -> float:
    """Return BENCH_MEMORY_CAP_GB if set, else 70% of the machine's memory, in GB."""
    value = os.environ.get("BENCH_MEMORY_CAP_GB")
    if value is None:
        return DEFAULT_CAP_SHARE * mem_total_bytes() / 1e9
    try:
        return float(value)
    except ValueError:
        sys.exit(f"error: BENCH_MEMORY_CAP_GB must be a number of GB, got {value!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work folder holding ckpt/")
    parser.add_argument("--repeats", type=int, default=2, help="measured runs per tool (default 2)")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help=f"comma-separated subset of {','.join(TOOLS)} (default: all)")
    parser.add_argument("--max-foreign-cpu", type=float, default=0.1,
                        help="CPU seconds per wall second that other processes may use during a run (default 0.1)")
    parser.add_argument("--max-retries", type=int, default=3, help="reruns of a contended run (default 3)")
    parser.add_argument("--quiet-timeout", type=float, default=900,
                        help="seconds to wait for a quiet machine before a run starts anyway (default 900)")
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="RSS in GB at which a run is stopped (default: BENCH_MEMORY_CAP_GB, else 70%% of "
                             "the machine's memory)")
    parser.add_argument("--min-available-gb", type=float, default=1.0,
                        help="stop a run when the machine's available memory falls under this many GB (default 1)")
    args = parser.parse_args()
    memory_cap_gb = args.memory_cap_gb if args.memory_cap_gb is not None else default_memory_cap_gb()
    if memory_cap_gb <= 0:
        sys.exit(f"error: the memory cap must be positive, got {memory_cap_gb} GB")

    work = args.work.resolve()
    ckpt_dirs = [work / "ckpt" / name for name in ("base", "ft1", "ft2", "ft3")]
    missing = [str(path) for path in ckpt_dirs if not path.is_dir()]
    if missing:
        sys.exit(f"error: checkpoint folders not found: {missing}; run benchmarks/build_checkpoints.py first")

    mergekit_python = BENCH_DIR / ".venv-mergekit" / "bin" / "python"
    ours_python = REPO_ROOT / ".venv" / "bin" / "python"
    fusionbench_python = BENCH_DIR / ".venv-fusionbench" / "bin" / "python"
    commands = {
        "mergekit": [str(BENCH_DIR / ".venv-mergekit" / "bin" / "mergekit-yaml"), str(RECIPE), "out/mergekit", *MERGEKIT_FLAGS],
        "ours": [str(REPO_ROOT / ".venv" / "bin" / "merge"), "run", str(RECIPE), "--output", "out/ours", *OURS_FLAGS],
        "ours-model-scope": [str(REPO_ROOT / ".venv" / "bin" / "merge"), "run", str(MODEL_SCOPE_RECIPE), "--output",
                             "out/ours-model-scope", *OURS_FLAGS],
        "fusionbench": [str(fusionbench_python), str(FUSIONBENCH_SCRIPT), str(MODEL_SCOPE_RECIPE), "--output",
                        "out/fusionbench"],
    }
    tools = [tool for tool in args.tools.split(",") if tool]
    unknown = sorted(set(tools) - set(commands))
    if unknown:
        sys.exit(f"error: unknown tool(s) {unknown}; expected a subset of {','.join(TOOLS)}")
    not_installed = [tool for tool in tools if not Path(commands[tool][0]).exists()]
    if not_installed:
        sys.exit(f"error: {not_installed} not installed ({[commands[tool][0] for tool in not_installed]}); "
                 f"run benchmarks/run.sh, which installs them, or leave them out of --tools")

    versions = tool_versions(mergekit_python, ours_python, fusionbench_python)
    # Offline, because the tools would otherwise ask the Hub about local paths they do not find.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    print(f"memory cap per run: {memory_cap_gb:.1f} GB of RSS, or {args.min_available_gb:.1f} GB left on the machine",
          flush=True)
    summaries: dict[str, Summary] = {}
    for round_index in range(args.repeats):
        for tool in tools:
            # A run that the watchdog stopped would be stopped again.
            if tool in summaries and any(run.stopped for run in summaries[tool].runs):
                continue
            output = work / "out" / tool
            for attempt in range(args.max_retries + 1):
                if output.exists():
                    shutil.rmtree(output)
                output.parent.mkdir(parents=True, exist_ok=True)
                warm_page_cache(ckpt_dirs)
                wait_until_quiet(max_load=args.max_foreign_cpu, window_s=3.0, timeout_s=args.quiet_timeout)
                result = run_measured(tool, round_index, commands[tool], cwd=work, env=env,
                                      cap_bytes=int(memory_cap_gb * 1e9),
                                      min_available_bytes=int(args.min_available_gb * 1e9))
                if result.stopped:
                    # A partial checkpoint must not reach the comparison.
                    shutil.rmtree(output, ignore_errors=True)
                    print(f"round {round_index + 1}/{args.repeats} {tool}: stopped at "
                          f"{result.peak_rss_bytes / 1e9:.2f} GB of RSS ({result.stopped}) after {result.wall_s:.1f} s. "
                          f"It is not run again.", flush=True)
                    break
                if result.returncode != 0:
                    print(result.log_tail, file=sys.stderr)
                    sys.exit(f"error: {tool} failed with exit code {result.returncode}; its log is {work / (tool + '.log')}")
                foreign_per_s = result.foreign_cpu_s / result.wall_s
                result.contended = foreign_per_s > args.max_foreign_cpu
                print(
                    f"round {round_index + 1}/{args.repeats} {tool}: {result.wall_s:.1f} s, "
                    f"peak RSS {result.peak_rss_bytes / 1e9:.2f} GB "
                    f"(anon {result.sampled_anon_at_peak_bytes / 1e9:.2f} GB, file {result.sampled_file_at_peak_bytes / 1e9:.2f} GB at the sampled peak), "
                    f"CPU {result.cpu_s:.1f} s, other processes {foreign_per_s:.2f} cores"
                    + (" (contended)" if result.contended else ""),
                    flush=True,
                )
                if not result.contended:
                    break
                if attempt < args.max_retries:
                    print(f"rerunning {tool}: other processes used CPU during the run", flush=True)
            summary = summaries.setdefault(tool, Summary(tool, None, 0))
            summary.runs.append(result)
            summary.max_peak_rss_bytes = max(summary.max_peak_rss_bytes, result.peak_rss_bytes)
            if not result.stopped:
                summary.best_wall_s = min(summary.best_wall_s or float("inf"), result.wall_s)
            summary.stopped = result.stopped if summary.best_wall_s is None else None

    report = {
        "machine": machine_info(),
        "versions": versions,
        "memory_cap_gb": memory_cap_gb,
        "min_available_gb": args.min_available_gb,
        "commands": {tool: " ".join(commands[tool]) for tool in tools},
        "summaries": {tool: asdict(summary) for tool, summary in summaries.items()},
    }
    (work / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_table(summaries))
    print(f"\nmachine: {report['machine']}\nversions: {report['versions']}\nresults: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
