"""Time `git_qlora_main.py --demo` as a user runs it, with the CPU time other guests stole from the machine.

    python benchmarks/bench_demo.py --runs 3                       # this checkout, three second runs
    python benchmarks/bench_demo.py --runs 2 --also ../old_checkout # alternating with another checkout
    python benchmarks/bench_demo.py --runs 1 --first               # empty the demo's user cache first

Each run prints its wall time split into starting and importing (until the demo's first log line), the stages
and report, and exiting; the demo's own seconds per stage; and the CPU seconds the hypervisor gave to other
guests meanwhile (`steal` in /proc/stat, summed over the cores). Where steal is more than a few seconds, wall
times of different runs are not comparable (README "The demo"). Nothing is asserted: numbers for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stolen_seconds() -> float | None:
    """CPU seconds stolen so far, summed over the cores (the 8th field of /proc/stat's cpu line); None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def time_demo(checkout: Path, output_dir: Path) -> dict:
    """One `--demo` in `checkout` (its own git_qlora_main.py, this Python), timed from outside."""
    steal_before, start = stolen_seconds(), time.perf_counter()
    proc = subprocess.Popen([sys.executable, "git_qlora_main.py", "--demo", "--output_dir", str(output_dir)], cwd=checkout,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_line = report_written = None
    for line in proc.stdout:
        now = time.perf_counter() - start
        if first_line is None and "Demo in " in line:
            first_line = now
        if "demo_report.json" in line and "Wrote" in line:
            report_written = now
    code, wall = proc.wait(), time.perf_counter() - start
    steal_after = stolen_seconds()
    if code != 0 or first_line is None or report_written is None:
        raise RuntimeError(f"--demo in {checkout} failed (exit {code})")
    stages = json.loads((output_dir / "demo_report.json").read_text())["seconds"]
    return {"checkout": str(checkout), "wall_s": round(wall, 2), "starting_s": round(first_line, 2),
            "stages_s": round(report_written - first_line, 2), "exiting_s": round(wall - report_written, 2),
            "stolen_s": None if steal_before is None else round(steal_after - steal_before, 1),
            "stage_seconds": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per checkout (default 3)")
    parser.add_argument("--also", type=Path, help="another checkout, run alternately with this one")
    parser.add_argument("--first", action="store_true", help="delete the demo's cached base model before the first run")
    parser.add_argument("--output_dir", type=Path, default=ROOT / "results" / "bench_demo")
    args = parser.parse_args()
    checkouts = [ROOT] + ([args.also.resolve()] if args.also else [])
    if args.first:
        sys.path.insert(0, str(ROOT))
        from utils.user_cache import user_cache_dir

        shutil.rmtree(user_cache_dir("demo_base_model"), ignore_errors=True)
    for run in range(args.runs):
        for k, checkout in enumerate(checkouts):
            print(json.dumps(time_demo(checkout, args.output_dir / f"run{run}_{k}")), flush=True)


if __name__ == "__main__":
    main()
