"""`make load`: start a gansteer stack, run locust against it headless for a bounded time, and say what happened.

1. `gansteer up --any-port --json` in the background: free gRPC and metrics ports (read from its first line), and
   its own `redis-server` on a free port, so nothing is shared with other users of 127.0.0.1:6379. With
   `--redis-url` the stack uses that Redis database instead, which must hold no `gansteer:` keys yet (it is the
   run's own), and its `gansteer:` keys are deleted at the end.
2. Waits until every service's readiness is SERVING, scrapes every metrics endpoint, and keeps scraping every 2 s
   while the load runs (the peaks of the queue gauges, the load average).
3. `locust --headless` with deploy/locust/locustfile.py, `--csv` into the output folder.
4. Scrapes again, writes `summary.json` and prints the table: per request type locust's requests, failures,
   rps, p50/p95/p99; from the stack's metrics the calls per method, batches, jobs ended and queue peaks.
5. Stops the stack. Exits 1 when any request or job failed, a user raised, the stack answered a call with an
   error, or its metrics did not count the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import summary  # beside this script, which is not a package

HERE = Path(__file__).resolve().parent
KEY_PREFIX = "gansteer:"  # the job store's and Celery's keys under `gansteer up` (JobSettings.key_prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--spawn-rate", type=float, default=10.0)
    parser.add_argument("--duration", default="3m", help="locust's --run-time: 20s, 3m, ...")
    parser.add_argument("--torch-threads", type=int, default=int(os.environ.get("GANSTEER_TORCH_THREADS", "1")))
    parser.add_argument("--redis-url", default="", help="a Redis database of this run's own (default: a new server)")
    parser.add_argument("--out", type=Path, default=Path("out/load"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("locust_*.csv"):
        stale.unlink()
    if args.redis_url and _redis_keys(args.redis_url):
        print(
            f"load: {args.redis_url} already holds {KEY_PREFIX}* keys; give a database of this run's own",
            file=sys.stderr,
        )
        return 2

    loadavg_before = _loadavg()
    stack, ports = _start_stack(args)
    try:
        return _run(args, ports, loadavg_before)
    finally:
        _stop_stack(stack)
        if args.redis_url:
            _delete_keys(args.redis_url)


def _run(args: argparse.Namespace, ports: dict[str, Any], loadavg_before: float) -> int:
    targets = {name: ports[name] for name in ("generation", "scoring", "optimization")}
    _wait_ready(targets.values())
    endpoints: dict[str, str] = ports["metrics"]
    before = _scrape(endpoints)
    peaks: dict[str, float] = {}
    loads: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(2.0):
            loads.append(_loadavg())
            try:
                summary.update_peaks(peaks, _scrape(endpoints))
            except OSError as error:  # a missed sample; the scrape after the run fails loudly if the stack is gone
                print(f"load: scrape failed: {error}", file=sys.stderr)

    watcher = threading.Thread(target=watch, name="load-watch", daemon=True)
    watcher.start()
    options = {
        "--users": args.users,
        "--spawn-rate": args.spawn_rate,
        "--run-time": args.duration,
        "--stop-timeout": 60,  # a user's job in flight at the end is watched to its end
        "--csv": args.out / "locust",
        "--html": args.out / "report.html",
        **{f"--{name}-target": target for name, target in targets.items()},
    }
    command = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--only-summary"]
    locust = subprocess.run([*command, *(str(part) for item in options.items() for part in item)], check=False)
    stop.set()
    watcher.join()
    time.sleep(2.5)  # the worker reads its Redis gauges at most every 2 s
    after = _scrape(endpoints)

    rows = summary.request_rows(args.out / "locust_stats.csv")
    stack = summary.stack_deltas(before, after)
    problems = _problems(args.out, locust.returncode, rows, stack)
    document = {
        "users": args.users,
        "spawn_rate": args.spawn_rate,
        "duration": args.duration,
        "torch_threads": args.torch_threads,
        "machine": _machine(),
        "loadavg_1m": {
            "before": loadavg_before,
            "during_mean": round(sum(loads) / len(loads), 2) if loads else None,
            "during_max": max(loads, default=None),
        },
        "requests": rows,
        "stack": stack,
        "peaks": peaks,
        "problems": problems,
    }
    (args.out / "summary.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nload: {args.users} users for {args.duration}, torch threads {args.torch_threads}, {_machine()}")
    print(f"1-minute load average: {loadavg_before} before, {document['loadavg_1m']['during_mean']} mean during\n")
    print(summary.format_requests(rows) + "\n\n" + summary.format_stack(stack, peaks) + "\n")
    print(f"written: {args.out}/summary.json, {args.out}/locust_stats.csv, {args.out}/report.html")
    for problem in problems:
        print(f"load: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _problems(out: Path, returncode: int, rows: list[dict[str, Any]], stack: dict[str, Any]) -> list[str]:
    """Why this run does not pass, or nothing."""
    problems = [f"locust exited {returncode}"] if returncode else []
    problems += [
        f"{row['failures']} {row['type']} {row['name']} failed"
        for row in rows
        if row["failures"] and row["name"] != "Aggregated"
    ]
    exceptions = out / "locust_exceptions.csv"
    if exceptions.exists() and len(exceptions.read_text().strip().splitlines()) > 1:
        problems.append(f"users raised errors ({exceptions})")
    problems += [
        f"{c['errors']} {c['service']} {c['method']} calls answered not OK" for c in stack["calls"] if c["errors"]
    ]
    counted = {c["method"]: c["calls"] for c in stack["calls"]}
    problems += [
        f"the stack counted {counted.get(row['name'], 0)} {row['name']} calls of the {row['requests']} locust made"
        for row in rows
        if row["type"] == "grpc" and counted.get(row["name"], 0) < row["requests"]
    ]
    if not any(row["type"] == "grpc" for row in rows):
        problems.append("locust made no call")
    return problems


def _start_stack(args: argparse.Namespace) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    command = [str(Path(sys.executable).with_name("gansteer")), "up", "--any-port", "--json"]
    command += ["--redis-url", args.redis_url] if args.redis_url else ["--transport", "redis-server"]
    env = {**os.environ, "GANSTEER_TORCH_THREADS": str(args.torch_threads)}
    log = (args.out / "stack.log").open("w")
    stack = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    log.close()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stack.stdout.readline() if stack.stdout else ""))
    reader.start()
    reader.join(120)
    if not lines or not lines[0].startswith("{"):
        _stop_stack(stack)
        raise SystemExit(f"load: `gansteer up` did not start; see {args.out / 'stack.log'}")
    print(f"load: stack up, {json.loads(lines[0])['transport']}; its log: {args.out / 'stack.log'}", flush=True)
    return stack, json.loads(lines[0])


def _stop_stack(stack: subprocess.Popen[str]) -> None:
    if stack.poll() is None:
        stack.send_signal(signal.SIGINT)
        try:
            stack.wait(60)
        except subprocess.TimeoutExpired:
            stack.kill()
            stack.wait()


def _wait_ready(targets: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for target in targets:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"load: {target} not ready within {timeout:.0f} s")
                time.sleep(0.5)


def _scrape(endpoints: dict[str, str]) -> dict[str, list[Any]]:
    snapshot = {}
    for name, url in endpoints.items():
        with urllib.request.urlopen(url, timeout=10) as answer:
            snapshot[name] = summary.parse_metrics(answer.read().decode())
    return snapshot


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return f"{os.cpu_count()} CPUs{f' ({model})' if model else ''}, {platform.system()} {platform.machine()}"


def _redis_keys(url: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return list(client.scan_iter(match=f"{KEY_PREFIX}*", count=1000))


def _delete_keys(url: str) -> None:
    keys = _redis_keys(url)
    with redis.Redis.from_url(url) as client:
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])


if __name__ == "__main__":
    sys.exit(main())
