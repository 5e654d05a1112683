"""Fixtures of the job tests: tiny random-weight models in a temporary registry, test-only job kinds, a worker in a
subprocess, the optimization service in this process, and a private corner of the real Redis.

Every stack gets its own key prefix (`gansteer-test-<random>:`), used by the job store and by Celery's keys, and
deletes every key under it when it stops, so tests share the Redis of CI and other sessions safely.

The worker subprocess runs this file: `python job_fixtures.py worker '<json>'` registers the test kinds, then runs
a real `celery worker` (prefork pool, one child) with the given settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import torch
from google.protobuf.message import Message
from safetensors.torch import save

from gansteer import Client
from gansteer.tensors import png_encode
from gansteer.v1 import common_pb2, optimization_pb2, optimization_pb2_grpc
from gansteer_server.config import Settings
from gansteer_server.jobs.backends import ModelBackend
from gansteer_server.jobs.kinds import CPU_QUEUE, JobKind, StepProgress, SubmitContext, register_kind
from gansteer_server.jobs.rounds import Answer, Round, RoundItem
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.models import ModelRegistry
from gansteer_server.models.architectures import build_architecture
from gansteer_server.models.architectures.scenes import ScenesClassifier, ScenesDiscriminator, ScenesGenerator
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.servers.app import start_generation_server, start_scoring_server
from gansteer_server.servers.optimization import RunningOptimizationService, start_optimization_server
from gansteer_server.wire.convert import float_tensor

OptimizationStub = optimization_pb2_grpc.OptimizationServiceStub
REDIS_URL = os.environ.get("GANSTEER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
GEN, DISC, CLF = "tiny-gen", "tiny-disc", "tiny-clf"
PIR, PIR_BINS = "tiny-pir", 10
LATENT, EMBEDDING, CLASSES, RESOLUTION = 16, 8, 4, 32
TESTS = Path(__file__).resolve().parent

# --- tiny models ---------------------------------------------------------------------------------------------------


def build_registry(root: Path) -> ModelRegistry:
    """tiny-gen (class-conditional, pairs with tiny-disc), tiny-disc and tiny-clf (the feature extractor)."""
    torch.manual_seed(0)
    registry = ModelRegistry([root])
    images = {"resolution": RESOLUTION, "channels": 3, "value_range": [-1.0, 1.0]}
    gen_kwargs = {"z_size": LATENT, "num_classes": CLASSES, "embedding_size": EMBEDDING, "widths": [32, 16, 8, 8]}
    disc_kwargs = {"num_classes": CLASSES, "widths": [8, 16, 16, 16]}
    clf_kwargs = {"num_classes": CLASSES, "widths": [8, 16, 32]}
    models = [
        (GEN, "generator", "scenes_generator", ScenesGenerator, {**gen_kwargs, "spectral_norm": False}),
        (DISC, "discriminator", "scenes_discriminator", ScenesDiscriminator, {**disc_kwargs, "spectral_norm": False}),
        (CLF, "classifier", "scenes_classifier", ScenesClassifier, clf_kwargs),
    ]
    for name, kind, architecture, cls, kwargs in models:
        module = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}).eval()
        card: dict[str, Any] = {
            "kind": kind,
            "format": "safetensors",
            "weights": "weights.safetensors",
            "architecture": architecture,
            "architecture_kwargs": kwargs,
            "num_classes": CLASSES,
            **images,
        }
        if kind == "generator":
            card |= {"latent_size": LATENT, "embedding_size": EMBEDDING, "extra": {"discriminator": DISC}}
        weights = save({k: v.contiguous() for k, v in module.state_dict().items()})
        registry.register(name, card, {"weights.safetensors": weights})
    _register_pir_estimators(registry, images, clf_kwargs)
    return registry


def _register_pir_estimators(registry: ModelRegistry, images: dict[str, Any], clf_kwargs: dict[str, Any]) -> None:
    """tiny-pir (10 bins on tiny-clf's architecture) and its check estimator tiny-pir-check, as a pir_estimator job
    registers them, for pir_tuning jobs."""
    kwargs = {"backbone": "scenes_classifier", "backbone_kwargs": clf_kwargs, "bins": PIR_BINS}
    for name, extra in ((f"{PIR}-check", {}), (PIR, {"check_estimator": f"{PIR}-check@1"})):
        module = build_architecture("pir_estimator", **kwargs).eval()
        card = {"kind": "pir_estimator", "format": "safetensors", "weights": "weights.safetensors"}
        card |= {"architecture": "pir_estimator", "architecture_kwargs": kwargs, **images}
        card["extra"] = extra | {"temperature": 0.01, "dataset": "tiny"}
        weights = save({k: v.contiguous() for k, v in module.state_dict().items()})
        registry.register(name, card, {"weights.safetensors": weights})


def target_png(seed: int, size: int = RESOLUTION) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return png_encode(pixels)


def inversion_spec(budget: int = 12, targets: int = 1, **fields: Any) -> optimization_pb2.JobSpec:
    """An inversion of random targets on the tiny generator; keyword arguments set InversionSpec fields, except
    `preview_every`, `priority`, `idempotency_key`, `time_limit_s` and `labels`, which are JobSpec's."""
    common = {
        k: fields.pop(k)
        for k in ("preview_every", "priority", "idempotency_key", "time_limit_s", "labels")
        if k in fields
    }
    inversion = optimization_pb2.InversionSpec(
        targets=[common_pb2.Image(png=target_png(i)) for i in range(targets)],
        generator=common_pb2.ModelRef(name=GEN),
        feature_extractor=common_pb2.ModelRef(name=CLF),
        budget=optimization_pb2.Budget(amount=budget),
        optimizer=optimization_pb2.Optimizer(name="adam", learning_rate=0.1),
        **fields,
    )
    return optimization_pb2.JobSpec(inversion=inversion, **common)


def evolution_spec(class_id: int | None = 1, **fields: Any) -> optimization_pb2.JobSpec:
    """An interactive evolution on the tiny generator, its class held fixed unless `class_id` is None; keyword
    arguments set InteractiveEvolutionSpec fields."""
    evolution = optimization_pb2.InteractiveEvolutionSpec(generator=common_pb2.ModelRef(name=GEN), **fields)
    if class_id is not None:
        evolution.condition.class_ids.ids.append(class_id)
    return optimization_pb2.JobSpec(interactive_evolution=evolution)


# --- test-only job kinds --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SleepSpec:
    steps: int
    sleep_s: float


class SleepRun:
    """A job that only sleeps: machinery tests without model cost. Its state is the step counter."""

    def __init__(self, spec: SleepSpec) -> None:
        self.spec, self._steps = spec, 0

    @property
    def done(self) -> bool:
        return self._steps >= self.spec.steps

    @property
    def steps(self) -> int:
        return self._steps

    def step(self) -> StepProgress:
        time.sleep(self.spec.sleep_s)
        self._steps += 1
        return StepProgress(step=self._steps, generator_calls=self._steps, criterion={"total": 1.0 / self._steps})

    def preview(self) -> torch.Tensor:
        return torch.zeros(1, 3, 4, 4)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self._steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._steps = int(state["steps"])

    def result(self) -> opt.JobResult:
        result = opt.JobResult(metrics={"steps": float(self._steps)})
        result.images.tensor.CopyFrom(common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[0, 3, 4, 4]))
        return result


class SleepKind(JobKind):
    name = "test_sleep"
    queue = CPU_QUEUE
    spec_type = SleepSpec

    def parse(self, message: Message, context: SubmitContext) -> SleepSpec:
        raise NotImplementedError("submitted with Jobs.submit in tests")

    def total_steps(self, spec: SleepSpec) -> int:
        return spec.steps

    def backend_name(self, spec: Any, settings: JobSettings) -> str:
        return "local"

    def start(self, spec: SleepSpec, backend: ModelBackend, settings: JobSettings) -> SleepRun:
        return SleepRun(spec)


class CrashRun(SleepRun):
    """Kills its own worker process at its first step, on every delivery (celery #9082's endless re-queue)."""

    def step(self) -> StepProgress:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


class CrashKind(SleepKind):
    name = "test_crash"

    def start(self, spec: SleepSpec, backend: ModelBackend, settings: JobSettings) -> SleepRun:
        return CrashRun(spec)


SLEEP, CRASH = register_kind(SleepKind()), register_kind(CrashKind())


@dataclass(frozen=True)
class RoundSpec:
    rounds: int  # rounds to answer before the job succeeds
    items: int  # images shown per round
    choose: int  # picks per answer, repeats allowed
    work_steps: int = 0  # plain steps after each answer, before the next round opens
    sleep_s: float = 0.0  # per plain step
    seed: int = 0


class RoundRun:
    """A job made of rounds: each opens a round of `items` latents and waits for `choose` picks; between rounds it
    does `work_steps` plain steps. Its state is what it received, so a test compares it with the interaction log."""

    def __init__(self, spec: RoundSpec) -> None:
        self.spec = spec
        self._steps, self._opened, self._work_left = 0, 0, 0
        self._awaiting = False
        self._picks: list[list[int]] = []
        self._raters: list[str] = []

    @property
    def done(self) -> bool:
        return len(self._picks) >= self.spec.rounds and self._work_left == 0

    @property
    def steps(self) -> int:
        return self._steps

    def step(self) -> StepProgress:
        if self._awaiting:
            raise AssertionError("stepped while a round waits for its answers")
        self._steps += 1
        if self._work_left:
            time.sleep(self.spec.sleep_s)
            self._work_left -= 1
            return StepProgress(step=self._steps, generator_calls=0, criterion={"total": float(len(self._picks))})
        self._opened += 1
        generator = torch.Generator().manual_seed(self.spec.seed * 1000 + self._opened)
        items = tuple(
            RoundItem(item_id=f"r{self._opened}i{i}", latent=torch.randn(LATENT, generator=generator), seed=i)
            for i in range(self.spec.items)
        )
        self._awaiting = True
        round_ = Round(number=self._opened, answer="choice", items=items, generator=f"{GEN}@1", choose=self.spec.choose)
        return StepProgress(step=self._steps, generator_calls=len(items), criterion={"total": 0.0}, round=round_)

    def receive(self, answers: list[Answer]) -> None:
        if not self._awaiting:
            raise AssertionError("answers delivered twice")
        self._picks.append([index for answer in answers for index in answer.choice])
        self._raters.extend(answer.rater for answer in answers)
        self._awaiting, self._work_left = False, self.spec.work_steps

    def preview(self) -> torch.Tensor:
        return torch.zeros(1, 3, 4, 4)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self._steps,
            "opened": self._opened,
            "work_left": self._work_left,
            "awaiting": self._awaiting,
            "picks": [torch.tensor(picks, dtype=torch.int64) for picks in self._picks],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._steps, self._opened = int(state["steps"]), int(state["opened"])
        self._work_left, self._awaiting = int(state["work_left"]), bool(state["awaiting"])
        self._picks = [picks.tolist() for picks in state["picks"]]

    def result(self) -> opt.JobResult:
        result = opt.JobResult(metrics={"rounds_answered": float(len(self._picks))})
        result.images.tensor.CopyFrom(float_tensor(torch.zeros(len(self._picks), 3, 4, 4)))  # one item per round
        for picks in self._picks:
            result.item_metrics.add(values={f"pick{i}": float(index) for i, index in enumerate(picks)})
        return result


class RoundKind(SleepKind):
    name = "test_rounds"
    spec_type = RoundSpec  # type: ignore[assignment]
    has_rounds = True

    def total_steps(self, spec: RoundSpec) -> int:  # type: ignore[override]
        return spec.rounds * (1 + spec.work_steps)

    def start(self, spec: RoundSpec, backend: ModelBackend, settings: JobSettings) -> RoundRun:  # type: ignore[override]
        return RoundRun(spec)


ROUNDS = register_kind(RoundKind())

# --- the stack -------------------------------------------------------------------------------------------------------

#: Job settings of the tests: short segments, leases and visibility timeout, so recovery takes seconds.
TEST_JOB_SETTINGS: dict[str, Any] = {
    "segment_steps": 5,
    "segment_seconds": 1.0,
    "lease_s": 3.0,
    "max_deliveries": 2,
    "visibility_timeout_s": 6.0,
    "restore_interval_s": 1.0,
    "progress_interval_s": 0.0,
    "default_feature_extractor": CLF,
}


def make_settings(registry_root: Path, **env: str) -> Settings:
    values = {
        "GANSTEER_REDIS_URL": REDIS_URL,
        "GANSTEER_REGISTRY": str(registry_root),
        "GANSTEER_OPTIMIZATION_PORT": "0",
        "GANSTEER_OPTIMIZATION_METRICS_PORT": "0",
        "GANSTEER_TORCH_THREADS": "1",
        "GANSTEER_LOG_LEVEL": "WARNING",
        **env,
    }
    return Settings.from_env(values)


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL the worker and its pool children (its process group), as a crash or an OOM kill would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class JobStack:
    """A private prefix of the real Redis, the tiny registry, and services/workers started on demand."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prefix = f"gansteer-test-{uuid.uuid4().hex[:12]}:"
        self.registry_root = self.root / "registry"
        if not self.registry_root.exists():
            build_registry(self.registry_root)
        self.settings = self.job_settings()
        self.servers: list[RunningOptimizationService] = []
        self.workers: list[Worker] = []
        self.redis = redis.Redis.from_url(REDIS_URL)

    def job_settings(self, **env: str) -> JobSettings:
        settings = make_settings(self.registry_root, **(self.env | env))
        return JobSettings.create(settings, key_prefix=self.prefix, **(TEST_JOB_SETTINGS | self.overrides))

    def start_server(
        self, **env: str
    ) -> tuple[RunningOptimizationService, optimization_pb2_grpc.OptimizationServiceStub]:
        server = start_optimization_server(self.job_settings(**env), port=0, metrics_port=0)
        self.servers.append(server)
        channel = grpc.insecure_channel(server.address)
        return server, optimization_pb2_grpc.OptimizationServiceStub(channel)

    def start_worker(self, name: str = "w") -> Worker:
        log = self.root / f"worker-{name}-{len(self.workers)}.log"
        config = {
            "env": self._env(),
            "job": {"key_prefix": self.prefix, **TEST_JOB_SETTINGS, **self.overrides},
            "name": f"{name}{len(self.workers)}-{self.prefix[14:26]}",
        }
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(TESTS / "job_fixtures.py"), "worker", json.dumps(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        worker = Worker(process, log)
        self.workers.append(worker)
        return worker

    def _env(self) -> dict[str, str]:
        return {
            "GANSTEER_REDIS_URL": REDIS_URL,
            "GANSTEER_REGISTRY": str(self.registry_root),
            "GANSTEER_TORCH_THREADS": "1",
            "GANSTEER_LOG_LEVEL": "INFO",
            "GANSTEER_WORKER_METRICS_PORT": "0",  # several workers per test: a fixed port would be taken twice
            **self.env,
        }

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        for server in self.servers:
            server.stop(grace=None)
        keys = list(self.redis.scan_iter(match=f"{self.prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            self.redis.delete(*keys[start : start + 500])
        self.redis.close()


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def watch_all(
    stub: optimization_pb2_grpc.OptimizationServiceStub, job_id: str, after: str = "", timeout: float = 60, **kw: Any
) -> list[optimization_pb2.JobEvent]:
    request = optimization_pb2.WatchJobRequest(job_id=job_id, after_event_id=after, **kw)
    return list(stub.WatchJob(request, timeout=timeout))


def final_state(events: list[optimization_pb2.JobEvent]) -> int:
    changes = [e.state_change.state for e in events if e.HasField("state_change")]
    return changes[-1] if changes else optimization_pb2.JOB_STATE_UNSPECIFIED


def _worker_main(config_json: str) -> None:
    """The worker subprocess: the real worker entry point, with the test kinds registered first."""
    from gansteer_server.jobs.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = json.loads(config_json)
    settings = Settings.from_env(config["env"])
    argv = ["--pool=prefork", "--concurrency=1", f"--hostname={config['name']}@%h"]
    run_worker(JobSettings.create(settings, **config["job"]), argv)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker_main(sys.argv[2])


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port, for tests that stop, kill or restart Redis (the
    shared one at 6379 must never be touched). `append_only`: persist every write to an AOF in `folder`, so that
    a shutdown and restart keep the data, as a production Redis would."""

    def __init__(self, folder: Path, *, append_only: bool = False) -> None:
        self.folder, self.append_only = folder, append_only
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        command += ["--save", ""] + (["--appendonly", "yes", "--appendfsync", "always"] if self.append_only else [])
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client), 10, "the private redis-server to answer")
        client.close()

    def stop(self) -> None:
        """SHUTDOWN as an operator would (the AOF is flushed), then wait for the process to end."""
        with contextlib.suppress(redis.ConnectionError):  # the reply is the connection closing
            redis.Redis.from_url(self.url).shutdown(nosave=False)
        assert self.process is not None
        self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL: Redis gone at once, as when its machine dies."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@contextlib.contextmanager
def private_redis_server(folder: Path, *, append_only: bool = False) -> Iterator[PrivateRedis]:
    """A started PrivateRedis, killed on exit if still running; skips the test where redis-server is missing."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on the PATH")
    server = PrivateRedis(folder, append_only=append_only)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


@contextlib.contextmanager
def sdk_stack(root: Path, *, timeout: float = 60) -> Iterator[tuple[Client, JobStack, list[str]]]:
    """The whole stack an SDK user talks to: generation and scoring services on the tiny registry, the optimization
    service and a worker subprocess on the real Redis; yields a Client on it, the JobStack and the three addresses
    (optimization, generation, scoring)."""
    stack = JobStack(root)
    settings = make_settings(stack.registry_root)
    generation = start_generation_server(settings, port=0, metrics_port=0)
    scoring = start_scoring_server(settings, port=0, metrics_port=0)
    try:
        optimization, _ = stack.start_server()
        stack.start_worker()
        addresses = [optimization.address, generation.address, scoring.address]
        with Client(
            addresses[0], generation_target=addresses[1], scoring_target=addresses[2], timeout=timeout
        ) as client:
            yield client, stack, addresses
    finally:
        stack.close()
        generation.stop(grace=None)
        scoring.stop(grace=None)
