"""Runs a command (default `make test`) several times in a row while busy processes load the CPU cores, and says
whether every run passed: the suite's tests must wait on events, not on the clock, so a loaded machine (a CI runner
shared with other jobs, a laptop compiling) must not fail them.

    python bench/stress.py                       # make test, 3 times, beside 2 busy processes
    python bench/stress.py --runs 1 --busy 4 -- .venv/bin/python -m pytest tests/test_cli.py

Exit status 0 when every run passed. Each run's exit status and wall time are printed and written to
`bench/results/stress.json`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def busy() -> None:
    """One core's worth of pure-Python arithmetic, until terminated."""
    value = 0
    while True:
        value = (value * 1103515245 + 12345) % 2**31


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="times to run the command (default 3)")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside it (default 2: both cores here)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "stress.json")
    parser.add_argument("command", nargs="*", help="the command (default: make test)")
    args = parser.parse_args(argv)
    command = args.command or ["make", "test"]
    loaders = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.busy)]
    for loader in loaders:
        loader.start()
    runs = []
    try:
        for index in range(args.runs):
            started = time.monotonic()
            code = subprocess.call(command)
            runs.append({"run": index + 1, "exit_status": code, "seconds": round(time.monotonic() - started, 1)})
            print(f"stress: run {index + 1}/{args.runs}: exit {code} in {runs[-1]['seconds']} s", flush=True)
    finally:
        for loader in loaders:
            loader.terminate()
            loader.join()
    passed = all(run["exit_status"] == 0 for run in runs)
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "busy_processes": args.busy,
        "cores": os.cpu_count(),
        "runs": runs,
        "all_passed": passed,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"stress: {'all passed' if passed else 'FAILED'}; wrote {args.output}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
