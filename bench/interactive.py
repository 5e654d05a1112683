"""Interactive evolution benchmark (HEVOL, seed 003, section V-D): a simulated person against random search, the
latency of a round, and what a waiting job holds.

    python bench/interactive.py            # full run: 30 targets, 8 jobs at a time (about 10 minutes on 2 cores)
    python bench/interactive.py --quick    # smoke run: 4 targets, 4 at a time

Writes `bench/results/interactive.json` (`--quick`: `interactive_quick.json`). The stack is a deployment's: a private
`redis-server`, the three services in this process (gRPC on loopback), and a `gansteer-worker` subprocess (prefork,
two children, one torch thread each) that runs every segment; the simulated persons answer through the SDK
(`gansteer.simulate.SimulatedPerson`, `Job.answer_rounds` -> SubmitFeedback), rendering each round with the
generation service and perceiving it with the scoring service. How each figure is made:

- hevol_win_rate: 30 hidden targets rendered by the data set's renderer with a seed no model saw
  (`render_scenes(30, seed=TARGET_SEED)`; training and evaluation used 100-500, bench/inversion.py 900). For each,
  an `interactive_evolution` job at its defaults (mu 5 of 28 shown, mutation rate 1/d self-adapted, class vector
  evolved) runs 6 rounds answered by a simulated person (features of `scenes-clf` layers stage2 and penultimate,
  noise 0.05 of its scale, no position bias); its result is the person's first pick of round 6. Random search shows
  the same person the same number of images (6 x 28 prior draws, random classes) and keeps the one it perceives
  best. A win: the HEVOL image is closer to the target by the person's noiseless feature distance (the issue's
  "judged the same way"). Ties count half. Also reported, not a bar: the same comparison judged by `scenes-judge`'s
  features, a network the person never used (NOTES: judge with what the loop did not optimise), and a 95% Wilson
  interval.
- round_latency_p95_ms: from the moment the person's answer is handed to the SDK (SubmitFeedback) to the moment the
  next round's 28 images are rendered on the client (the answer's RPC, Celery on Redis, the worker's segment, the
  event stream, one Generate call), over every round of the win-rate run, which keeps 8 evolution jobs open at once.
- workers_busy_while_waiting: 8 jobs submitted and left waiting at their first round; once all 8 are
  WAITING_FOR_FEEDBACK, the worker's active and reserved tasks (Celery inspect) plus the messages on the queues and
  unacknowledged in Redis. Must be 0: a job that waits for a person holds no worker.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis
from PIL import Image

from gansteer import Client, JobState
from gansteer.simulate import SimulatedPerson, Target
from gansteer.types import Answer, Round
from gansteer_server.data.scenes import render_scenes
from gansteer_server.embedded import start_redis_server, start_stack
from gansteer_server.jobs.celery_app import Jobs

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "scenes-gen"
TARGET_SEED = 7_700  # render_scenes seeds used elsewhere: 100, 101 (GAN), 200, 300 (classifiers), 400, 500, 900
ROUNDS, SHOWN = 6, 28
NOISE = 0.05


class TimedPerson(SimulatedPerson):
    """A simulated person that also times, for each round after the first, its answer -> the next round's images."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.latencies_ms: list[float] = []
        self._answered_at: float | None = None

    def __call__(self, round: Round) -> Answer:
        images = round.images()
        if self._answered_at is not None:
            self.latencies_ms.append((time.perf_counter() - self._answered_at) * 1000)
        answer = Answer(choice=self.pick(images, round.choose))
        self._answered_at = time.perf_counter()  # the SDK sends it at once
        return answer


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def start_worker(redis_url: str, generation: str, scoring: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GANSTEER_REDIS_URL": redis_url,
        "GANSTEER_GENERATION_ADDRESS": generation,
        "GANSTEER_SCORING_ADDRESS": scoring,
        "GANSTEER_TORCH_THREADS": "1",
        "GANSTEER_LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "gansteer_server.jobs.worker", "-c", "2", "--hostname", "bench@%h"]
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def one_target(client: Client, index: int, target: bytes) -> dict[str, Any]:
    person = TimedPerson(client, Target(target), noise=NOISE, rater_id=f"sim-{index}", seed=index)
    judge = SimulatedPerson(client, Target(target), perceive_with="scenes-judge")
    job = client.evolve(model=MODEL, rounds=ROUNDS, seed=index, labels={"bench": "interactive"})
    status = person.answer(job)
    if status.state is not JobState.SUCCEEDED:
        raise RuntimeError(f"job {job.id} ended {status.state}: {status.error}")
    hevol = job.result(wait=False).images[0]
    rng = np.random.default_rng(10_000 + index)
    classes = [int(c) for c in rng.integers(0, 10, ROUNDS * SHOWN)]
    shown = client.generate(MODEL, ROUNDS * SHOWN, seed=10_000 + index, classes=classes).images
    best = shown[person.pick(shown, 1)[0]]
    mine, theirs = person.distances([hevol, best])
    judged = judge.distances([hevol, best])
    return {
        "target": index,
        "hevol_distance": float(mine),
        "random_distance": float(theirs),
        "win": 1.0 if mine < theirs else 0.5 if mine == theirs else 0.0,
        "judge_win": 1.0 if judged[0] < judged[1] else 0.5 if judged[0] == judged[1] else 0.0,
        "latencies_ms": person.latencies_ms,
        "interactions": len(job.interactions()),
    }


def busy_while_waiting(client: Client, jobs: Jobs, store: redis.Redis, count: int) -> dict[str, Any]:
    waiting = [client.evolve(model=MODEL, seed=1000 + i, labels={"bench": "waiting"}) for i in range(count)]
    deadline = time.monotonic() + 120
    while not all(job.status().state is JobState.WAITING_FOR_FEEDBACK for job in waiting):
        if time.monotonic() > deadline:
            raise RuntimeError("the jobs did not all reach WAITING_FOR_FEEDBACK in 120 s")
        time.sleep(0.2)
    time.sleep(1.0)  # let anything a worker might still hold show up
    inspect = jobs.celery.control.inspect(timeout=3.0)
    active, reserved = inspect.active() or {}, inspect.reserved() or {}
    queued = {key.decode(): store.llen(key) for key in store.scan_iter() if store.type(key) == b"list"}
    unacked = sum(store.hlen(key) for key in store.scan_iter(match="*unacked") if store.type(key) == b"hash")
    figures = {
        "jobs_waiting": count,
        "active_tasks": sum(len(tasks) for tasks in active.values()),
        "reserved_tasks": sum(len(tasks) for tasks in reserved.values()),
        "worker_nodes_answering": sorted(set(active) | set(reserved)),
        "queued_messages": {k: v for k, v in queued.items() if v and "interactions" not in k and "events" not in k},
        "unacked_messages": unacked,
    }
    for job in waiting:
        job.cancel("benchmark done")
    return figures


def wilson(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 targets, 4 at a time")
    args = parser.parse_args()
    targets, concurrent = (4, 4) if args.quick else (30, 8)
    started = time.perf_counter()
    load_before = os.getloadavg()
    redis_server = start_redis_server()
    stack = start_stack(redis_url=redis_server.url, worker=False, torch_threads=1)
    log = Path(tempfile.gettempdir()) / f"gansteer-bench-interactive-worker-{os.getpid()}.log"
    worker = start_worker(redis_server.url, stack.generation_address, stack.scoring_address, log)
    try:
        client = Client(
            stack.optimization_address,
            generation_target=stack.generation_address,
            scoring_target=stack.scoring_address,
            api_key=stack.api_key,
            timeout=120,
        )
        pixels = render_scenes(targets, seed=TARGET_SEED).images
        with ThreadPoolExecutor(concurrent) as pool:
            runs = list(pool.map(lambda i: one_target(client, i, png(pixels[i])), range(targets)))
        wins = sum(run["win"] for run in runs)
        latencies = sorted(ms for run in runs for ms in run["latencies_ms"])
        p95 = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)]
        busy = busy_while_waiting(client, Jobs(stack.job_settings), redis.Redis.from_url(redis_server.url), concurrent)
        client.close()
    finally:
        worker.terminate()
        worker.wait(30)
        stack.stop()
        redis_server.stop()
    low, high = wilson(wins, targets)
    result = {
        "hevol_win_rate": wins / targets,
        "hevol_win_rate_ci95": [low, high],
        "hevol_judge_win_rate": sum(run["judge_win"] for run in runs) / targets,
        "round_latency_p95_ms": p95,
        "round_latency_p50_ms": statistics.median(latencies),
        "round_latencies": len(latencies),
        "workers_busy_while_waiting": busy["active_tasks"]
        + busy["reserved_tasks"]
        + busy["unacked_messages"]
        + sum(busy["queued_messages"].values()),
        "waiting_detail": busy,
        "bars": {"hevol_win_rate": ">= 0.7", "round_latency_p95_ms": "<= 1000", "workers_busy_while_waiting": "== 0"},
        "setup": {
            "targets": targets,
            "target_seed": TARGET_SEED,
            "concurrent_jobs": concurrent,
            "rounds": ROUNDS,
            "shown_per_round": SHOWN,
            "random_search_images": ROUNDS * SHOWN,
            "person": {"perceive_with": "scenes-clf", "layers": ["stage2", "penultimate"], "noise": NOISE},
            "judge": "scenes-judge (stage2, penultimate), not used by the person",
            "worker": "gansteer-worker subprocess, prefork, 2 children, 1 torch thread each",
            "services": "generation, scoring, optimization in the bench process, 1 torch thread",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "wall_s": time.perf_counter() - started,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "per_target": [{k: v for k, v in run.items() if k != "latencies_ms"} for run in runs],
    }
    RESULTS.mkdir(exist_ok=True)
    name = "interactive_quick.json" if args.quick else "interactive.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("hevol_win_rate", "hevol_judge_win_rate", "round_latency_p95_ms")}
    print(json.dumps(summary | {"workers_busy_while_waiting": result["workers_busy_while_waiting"]}, indent=2))


if __name__ == "__main__":
    main()
