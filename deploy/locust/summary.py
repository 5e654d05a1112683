"""The load test's summary: locust's per-request figures from its `--csv` stats file, and what the stack's own
Prometheus metrics say happened (counter deltas between a scrape before and after the run, gauge peaks seen
while it ran), so a reader sees both that the load was answered and that it reached the stack.

Pure functions on text and rows; deploy/locust/load.py does the scraping and the files.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

#: Locust's stats CSV columns read into each row, by the summary's own names.
_COLUMNS = {
    "requests": "Request Count",
    "failures": "Failure Count",
    "rps": "Requests/s",
    "mean_ms": "Average Response Time",
    "p50_ms": "50%",
    "p95_ms": "95%",
    "p99_ms": "99%",
    "max_ms": "Max Response Time",
}

#: Gauges whose largest value while the load ran shows how far work queued up: (endpoint, metric, label filter).
PEAK_GAUGES: dict[str, tuple[str, str, dict[str, str]]] = {
    "celery_queue_messages": ("worker", "gansteer_queue_messages", {}),
    "jobs_queued": ("worker", "gansteer_jobs", {"state": "queued"}),
    "jobs_running": ("worker", "gansteer_jobs", {"state": "running"}),
    "generation_queue_images": ("generation", "gansteer_queue_images", {}),
    "scoring_queue_images": ("scoring", "gansteer_queue_images", {}),
    "generation_in_flight": ("generation", "gansteer_requests_in_flight", {}),
    "scoring_in_flight": ("scoring", "gansteer_requests_in_flight", {}),
    "optimization_in_flight": ("optimization", "gansteer_requests_in_flight", {}),
}


def request_rows(stats_csv: Path) -> list[dict[str, Any]]:
    """One row per request type and name, then the aggregate (type ``, name `Aggregated`), as locust wrote them;
    a percentile locust has no value for (no request) is None."""
    with stats_csv.open(newline="") as file:
        return [
            {
                "type": row["Type"],
                "name": row["Name"],
                **{key: _number(row[column]) for key, column in _COLUMNS.items()},
            }
            for row in csv.DictReader(file)
        ]


def _number(text: str) -> float | int | None:
    if text in ("", "N/A"):
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else round(value, 2)


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def _total(samples: Iterable[Sample], name: str, by: tuple[str, ...], where: Mapping[str, str] | None = None) -> dict:
    """Sum of `name`'s samples grouped by the labels `by`, over those matching `where`."""
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in (where or {}).items()):
            sums[tuple(sample.labels.get(label, "") for label in by)] += sample.value
    return sums


def _delta(before: list[Sample], after: list[Sample], name: str, by: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    start, end = _total(before, name, by), _total(after, name, by)
    return {key: value - start.get(key, 0.0) for key, value in sorted(end.items()) if value - start.get(key, 0.0)}


def stack_deltas(before: Mapping[str, list[Sample]], after: Mapping[str, list[Sample]]) -> dict[str, Any]:
    """What the stack counted during the run, from scrapes of each endpoint (`generation`, `scoring`,
    `optimization`, `worker`) before and after it."""
    calls: list[dict[str, Any]] = []
    for endpoint in ("generation", "scoring", "optimization"):
        by_code = _delta(before[endpoint], after[endpoint], "gansteer_requests_total", ("method", "code"))
        for method in sorted({method for method, _ in by_code}):
            counts = {code: int(n) for (m, code), n in by_code.items() if m == method}
            errors = sum(n for code, n in counts.items() if code != "OK")
            calls.append({"service": endpoint, "method": method, "calls": sum(counts.values()), "errors": errors})
    batches = []
    for endpoint in ("generation", "scoring"):
        runs, images, requests = (
            sum(_delta(before[endpoint], after[endpoint], f"gansteer_batch_{name}", ()).values())
            for name in ("images_count", "images_sum", "requests_sum")
        )
        if runs:
            batches.append(
                {
                    "service": endpoint,
                    "batches": int(runs),
                    "images_per_batch": round(images / runs, 2),
                    "requests_per_batch": round(requests / runs, 2),
                }
            )
    worker_before, worker_after = before["worker"], after["worker"]
    jobs = _delta(worker_before, worker_after, "gansteer_job_transitions_total", ("kind", "to_state"))
    cpu = _delta(before["generation"], after["generation"], "process_cpu_seconds_total", ())
    return {
        "calls": calls,
        "batches": batches,
        "jobs_ended": {
            f"{kind} {state}": int(n)
            for (kind, state), n in jobs.items()
            if state in ("succeeded", "failed", "cancelled")
        },
        "worker_tasks": {
            f"{kind} {outcome}": int(n)
            for (kind, outcome), n in _delta(
                worker_before, worker_after, "gansteer_worker_tasks_total", ("kind", "outcome")
            ).items()
        },
        "dropped_requests": int(
            sum(
                sum(_delta(before[e], after[e], "gansteer_dropped_requests_total", ()).values())
                for e in ("generation", "scoring")
            )
        ),
        "stack_cpu_seconds": round(cpu.get((), 0.0), 1),
    }


def update_peaks(peaks: dict[str, float], snapshot: Mapping[str, list[Sample]]) -> None:
    """Raise each of PEAK_GAUGES in `peaks` to its value in `snapshot` (endpoint -> samples), summed over the
    other labels (every queue, every model)."""
    for key, (endpoint, name, where) in PEAK_GAUGES.items():
        if endpoint in snapshot:
            value = sum(_total(snapshot[endpoint], name, (), where).values())
            peaks[key] = max(peaks.get(key, 0.0), value)


def format_requests(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'type':5} {'name':16} {'requests':>8} {'failures':>8} {'rps':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        percentiles = " ".join(
            f"{row[key] if row[key] is not None else '-':>7}" for key in ("p50_ms", "p95_ms", "p99_ms")
        )
        counts = f"{row['requests']:>8} {row['failures']:>8} {row['rps']:>7.2f}"
        lines.append(f"{row['type']:5} {row['name']:16} {counts} {percentiles}")
    return "\n".join(lines)


def format_stack(stack: Mapping[str, Any], peaks: Mapping[str, float]) -> str:
    lines = ["calls the services counted (gansteer_requests_total):"]
    lines += [
        f"  {c['service']:13} {c['method']:16} {c['calls']:>7} calls, {c['errors']} not OK" for c in stack["calls"]
    ]
    lines.append("dynamic batches (gansteer_batch_*):")
    lines += [
        f"  {b['service']:13} {b['batches']:>7} batches, {b['images_per_batch']} images and "
        f"{b['requests_per_batch']} requests each"
        for b in stack["batches"]
    ]
    lines.append(f"jobs ended (gansteer_job_transitions_total): {_inline(stack['jobs_ended'])}")
    lines.append(f"worker tasks (gansteer_worker_tasks_total): {_inline(stack['worker_tasks'])}")
    lines.append(f"dropped requests: {stack['dropped_requests']}; stack CPU: {stack['stack_cpu_seconds']} s")
    lines.append(f"peaks while loaded: {_inline({k: int(v) for k, v in peaks.items()})}")
    return "\n".join(lines)


def _inline(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in values.items()) or "none"
