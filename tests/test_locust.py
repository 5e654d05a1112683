"""The load test's parts (deploy/locust): the locustfile reports real calls to locust the documented way, and the
summary reads locust's CSV and the stack's metrics. `make load` itself runs a stack for minutes; it is not run here.

The locustfile runs in a subprocess: importing locust monkey-patches the standard library for gevent, which must
not happen to the test process and its servers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from service_fixtures import GEN, make_settings, running, shared_tiny_registry

from gansteer.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from gansteer_server.models import ModelRegistry

LOCUST = Path(__file__).resolve().parents[1] / "deploy" / "locust"

CLIENT = """
import importlib.util, json, sys
import grpc
spec = importlib.util.spec_from_file_location("locustfile", sys.argv[1])
locustfile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(locustfile)
from locust.env import Environment
from gansteer.v1 import common_pb2, generation_pb2, generation_pb2_grpc

environment = Environment()
seen = []
environment.events.request.add_listener(lambda **event: seen.append(event))
stub = generation_pb2_grpc.GenerationServiceStub(locustfile.reporting_channel(environment, sys.argv[2]))
seeded = generation_pb2.SeededLatents(seed=7, count=2)
stub.Generate(generation_pb2.GenerateRequest(model=common_pb2.ModelRef(name=sys.argv[3]), seeded=seeded))
try:
    stub.Generate(generation_pb2.GenerateRequest(model=common_pb2.ModelRef(name="no-such-model"), seeded=seeded))
except grpc.RpcError:
    pass
request = generation_pb2.GenerateRequest(model=common_pb2.ModelRef(name=sys.argv[3]), seeded=seeded, chunk_size=1)
chunks = list(stub.GenerateStream(request))
print(json.dumps([
    {**{k: event[k] for k in ("request_type", "name", "response_time", "response_length")},
     "exception": event["exception"].code().name if event["exception"] else None}
    for event in seen
]))
"""


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return shared_tiny_registry(tmp_path_factory)


@pytest.fixture
def generation(tiny_registry: ModelRegistry) -> Iterator[tuple[str, grpc.Channel]]:
    with running("generation", make_settings(tiny_registry)) as (server, channel):
        yield server.address, channel


def _summary() -> ModuleType:
    spec = importlib.util.spec_from_file_location("load_summary", LOCUST / "summary.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.service
def test_the_locustfile_reports_each_real_call_to_locust(generation: tuple[str, grpc.Channel]) -> None:
    address, channel = generation
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, str(LOCUST / "locustfile.py"), address, GEN],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    events = json.loads(done.stdout.strip().splitlines()[-1])

    # The same seeded request answers the same bytes, so the reported length can be checked against one made here.
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    request = generation_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name=GEN), seeded=generation_pb2.SeededLatents(seed=7, count=2), chunk_size=1
    )
    answered = stub.Generate(request).ByteSize()
    streamed = sum(chunk.ByteSize() for chunk in stub.GenerateStream(request))
    assert [(e["request_type"], e["name"], e["exception"]) for e in events] == [
        ("grpc", "Generate", None),
        ("grpc", "Generate", "NOT_FOUND"),
        ("grpc", "GenerateStream", None),
    ]
    assert [e["response_length"] for e in events] == [answered, 0, streamed]
    assert all(0 < e["response_time"] < 30_000 for e in events)


STATS = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,\
Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
grpc,Generate,900,0,12,20.5,3.1,410.7,12000,5.0,0.0,12,15,17,20,40,96,150,210,400,410,410
job,inversion,30,1,2100,2500.25,900,8000,0,0.1666,0.0055,2100,2300,2500,2700,4000,6000,7900,8000,8000,8000,8000
grpc,ListScorers,0,0,0,0,0,0,0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A
,Aggregated,930,1,12,45.2,3.1,8000,11600,5.1666,0.0055,12,15,17,20,45,120,1900,2500,8000,8000,8000
"""


def test_the_summary_reads_locusts_csv_and_the_stacks_metrics(tmp_path: Path) -> None:
    summary = _summary()
    (tmp_path / "locust_stats.csv").write_text(STATS)
    rows = summary.request_rows(tmp_path / "locust_stats.csv")
    assert [(r["type"], r["name"], r["requests"], r["failures"]) for r in rows] == [
        ("grpc", "Generate", 900, 0),
        ("job", "inversion", 30, 1),
        ("grpc", "ListScorers", 0, 0),
        ("", "Aggregated", 930, 1),
    ]
    assert (rows[0]["rps"], rows[0]["p50_ms"], rows[0]["p95_ms"], rows[0]["p99_ms"]) == (5.0, 12, 96, 210)
    assert (rows[1]["rps"], rows[1]["p99_ms"], rows[2]["p50_ms"]) == (0.17, 8000, None)
    table = summary.format_requests(rows).splitlines()
    assert table[0].split() == ["type", "name", "requests", "failures", "rps", "p50", "ms", "p95", "ms", "p99", "ms"]
    assert table[2].split() == ["grpc", "Generate", "900", "0", "5.00", "12", "96", "210"]
    assert table[4].split() == ["grpc", "ListScorers", "0", "0", "0.00", "-", "-", "-"]

    def exposition(generated: int, bad: int, images: int, batches: int, succeeded: int, queued: int) -> str:
        return (
            "# TYPE gansteer_requests_total counter\n"
            f'gansteer_requests_total{{service="generation",method="Generate",code="OK"}} {generated}\n'
            f'gansteer_requests_total{{service="generation",method="Generate",code="INVALID_ARGUMENT"}} {bad}\n'
            "# TYPE gansteer_batch_images histogram\n"
            f'gansteer_batch_images_bucket{{service="generation",model="g@1",le="+Inf"}} {batches}\n'
            f'gansteer_batch_images_sum{{service="generation",model="g@1"}} {images}\n'
            f'gansteer_batch_images_count{{service="generation",model="g@1"}} {batches}\n'
            "# TYPE gansteer_job_transitions_total counter\n"
            'gansteer_job_transitions_total{kind="inversion",from_state="running",to_state="succeeded"} '
            f"{succeeded}\n"
            "# TYPE gansteer_queue_messages gauge\n"
            f'gansteer_queue_messages{{queue="gpu"}} {queued}\ngansteer_queue_messages{{queue="cpu"}} 1\n'
        )

    def scrape(**counts: int) -> dict[str, list]:
        samples = summary.parse_metrics(exposition(**counts))
        return {"generation": samples, "scoring": [], "optimization": [], "worker": samples}

    before = scrape(generated=5, bad=0, images=10, batches=5, succeeded=2, queued=0)
    after = scrape(generated=905, bad=2, images=3610, batches=605, succeeded=32, queued=0)
    stack = summary.stack_deltas(before, after)
    assert stack["calls"] == [{"service": "generation", "method": "Generate", "calls": 902, "errors": 2}]
    assert stack["batches"] == [
        {"service": "generation", "batches": 600, "images_per_batch": 6.0, "requests_per_batch": 0.0}
    ]
    assert stack["jobs_ended"] == {"inversion succeeded": 30}

    peaks: dict[str, float] = {}
    for queued in (3, 9, 4):
        summary.update_peaks(peaks, scrape(generated=0, bad=0, images=0, batches=0, succeeded=0, queued=queued))
    assert peaks["celery_queue_messages"] == 10  # gpu 9 + cpu 1 at the busiest scrape
