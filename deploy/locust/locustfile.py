"""Locust users for a gansteer stack, calling its gRPC API the way a design tool does.

Most users sketch: they ask the generation service for a few seeded images, look, and ask again. Some score what
they generated with outputs that ListScorers names. A few invert an image: they submit a small inversion job and
watch it to its end over WatchJob. Each user is one client with its own channels, as each tool instance would be.

Follows locust's documented gRPC pattern: gRPC made gevent-compatible before any gRPC object exists, and a client
interceptor that fires `environment.events.request` for every call (type `grpc`, the method name, the response
time, the response length, the exception). A finished inversion is also reported as type `job`, name `inversion`,
timed from SubmitJob to its final state, and failed unless it succeeded.

`make load` runs it against a stack it starts (deploy/locust/load.py). Alone, against running services:

    locust -f deploy/locust/locustfile.py --headless -u 5 -r 5 -t 20s \\
        --generation-target 127.0.0.1:50051 --scoring-target 127.0.0.1:50052 --optimization-target 127.0.0.1:50053

With API keys on, `--api-key` (default `GANSTEER_API_KEY`, else the first of `GANSTEER_API_KEYS`) is sent as
`authorization: Bearer <key>`.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent
import locust.stats  # importing locust patches the standard library for gevent
from locust import User, between, events, task
from locust.env import Environment

# After gevent's patch, before any channel: gRPC's I/O then yields to the other users' greenlets.
grpc.experimental.gevent.init_gevent()

from gansteer.v1 import (  # noqa: E402  (gRPC objects only after init_gevent)
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    optimization_pb2,
    optimization_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)

#: Deadline of a unary call; a WatchJob stream has `--job-timeout` (the whole job, its queue wait included).
CALL_TIMEOUT_S = 30.0


def _default_api_key() -> str:
    keys = [key.strip() for key in os.environ.get("GANSTEER_API_KEYS", "").split(",") if key.strip()]
    return os.environ.get("GANSTEER_API_KEY", "") or (keys[0] if keys else "")


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    env = os.environ.get
    parser.add_argument("--generation-target", default=env("GANSTEER_GENERATION_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--scoring-target", default=env("GANSTEER_SCORING_TARGET", "127.0.0.1:50052"))
    parser.add_argument("--optimization-target", default=env("GANSTEER_TARGET", "127.0.0.1:50053"))
    parser.add_argument("--api-key", default=_default_api_key(), help="sent as `authorization: Bearer <key>`")
    parser.add_argument("--generator", default="scenes-gen", help="the generator the users sketch with")
    parser.add_argument("--inversion-steps", type=int, default=20, help="budget of each inversion job")
    parser.add_argument("--job-timeout", type=float, default=300.0, help="deadline of a WatchJob stream, s")


@events.quitting.add_listener
def _last_csv_rows(environment: Environment, **_kwargs: Any) -> None:
    """Locust rewrites its `--csv` stats every CSV_STATS_INTERVAL_SEC and only closes the files at exit, so the
    calls of the users' last tasks (finished within --stop-timeout) could miss them: one more interval writes them."""
    if environment.parsed_options is not None and environment.parsed_options.csv_prefix:
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.5)


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Reports each call to locust. A stream is one request, timed until its last message (as the server's
    `gansteer_request_seconds` times it); a stream the caller abandons is cancelled and not reported."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        start = time.perf_counter()
        call = continuation(client_call_details, request)
        try:
            self._report(client_call_details.method, start, call.result().ByteSize(), None)
        except grpc.RpcError as error:
            self._report(client_call_details.method, start, 0, error)
        return call

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._reported_stream(
            client_call_details.method, time.perf_counter(), continuation, client_call_details, request
        )

    def _reported_stream(self, method: str | bytes, start: float, continuation: Any, *call: Any) -> Iterator[Any]:
        stream = continuation(*call)
        length, ended = 0, False
        try:
            for message in stream:
                length += message.ByteSize()
                yield message
            ended = True
            self._report(method, start, length, None)
        except grpc.RpcError as error:
            ended = True
            self._report(method, start, length, error)
            raise
        finally:
            if not ended:
                stream.cancel()

    def _report(self, method: str | bytes, start: float, length: int, exception: Exception | None) -> None:
        name = method.decode() if isinstance(method, bytes) else method
        self.environment.events.request.fire(
            request_type="grpc",
            name=name.rsplit("/", 1)[-1],  # `Generate`, as the services' `method` label names it
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            response=None,
            context={},
            exception=exception,
        )


def reporting_channel(environment: Environment, target: str) -> grpc.Channel:
    """A channel to `target` whose calls are reported to `environment`."""
    return grpc.intercept_channel(grpc.insecure_channel(target), LocustInterceptor(environment))


def reported_elsewhere(body: Callable[..., None]) -> Callable[..., None]:
    """A task ends at its first failed call: the interceptor has counted the failure already, and locust would
    count the raised error a second time as a user error."""

    @wraps(body)
    def run(self: Any) -> None:
        try:
            body(self)
        except grpc.RpcError:
            return

    return run


class DesignToolUser(User):
    """One design-tool client: channels to the three services, and the model list it fetches when it opens."""

    abstract = True

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.metadata = (("authorization", f"Bearer {options.api_key}"),) if options.api_key else ()
        self.generator = common_pb2.ModelRef(name=options.generator)
        self.channels = [
            reporting_channel(self.environment, target)
            for target in (options.generation_target, options.scoring_target, options.optimization_target)
        ]
        self.generation = generation_pb2_grpc.GenerationServiceStub(self.channels[0])
        self.scoring = scoring_pb2_grpc.ScoringServiceStub(self.channels[1])
        self.optimization = optimization_pb2_grpc.OptimizationServiceStub(self.channels[2])
        self.random = random.Random()
        self.generation.ListModels(generation_pb2.ListModelsRequest(), metadata=self.metadata, timeout=CALL_TIMEOUT_S)

    def on_stop(self) -> None:
        for channel in self.channels:
            channel.close()

    def generate(self, count: int) -> generation_pb2.GenerateResponse:
        request = generation_pb2.GenerateRequest(
            model=self.generator,
            seeded=generation_pb2.SeededLatents(seed=self.random.getrandbits(32), count=count),
        )
        return self.generation.Generate(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)


class Sketching(DesignToolUser):
    """Asks for a few seeded images, looks at them, asks again."""

    weight = 6
    wait_time = between(1, 3)

    @task
    @reported_elsewhere
    def generate_images(self) -> None:
        self.generate(self.random.choice((2, 4, 4, 8)))


class Scoring(DesignToolUser):
    """Generates images and scores them with two of the outputs ListScorers names."""

    weight = 3
    wait_time = between(2, 5)

    def on_start(self) -> None:
        super().on_start()
        answer = self.scoring.ListScorers(
            scoring_pb2.ListScorersRequest(), metadata=self.metadata, timeout=CALL_TIMEOUT_S
        )
        self.outputs = scorable_outputs(answer)

    @task
    @reported_elsewhere
    def score_images(self) -> None:
        images = self.generate(4).images
        chosen = self.random.sample(self.outputs, k=min(2, len(self.outputs)))
        outputs = [
            scoring_pb2.OutputRequest(output=name, key=f"{name}@{model}", model=common_pb2.ModelRef(name=model))
            for name, model in chosen
        ]
        request = scoring_pb2.ScoreRequest(images=images, outputs=outputs)
        self.scoring.Score(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)


def scorable_outputs(answer: scoring_pb2.ListScorersResponse) -> list[tuple[str, str]]:
    """(output, model) pairs a tool can show for any image: per-image outputs of a registered model that need no
    parameter (every one defaults to none; a default such as top_k's k=5 does not fit a 3-class classifier)."""
    return [
        (scorer.name, model.split("@", 1)[0])
        for scorer in answer.scorers
        if scorer.per_image and all(param.default_json == "null" for param in scorer.params)
        for model in scorer.models
    ]


class Inverting(DesignToolUser):
    """Submits a small inversion of an image it generated, watches it to its end, fetches the result."""

    weight = 1
    wait_time = between(5, 15)

    @task
    @reported_elsewhere
    def invert_image(self) -> None:
        target = self.generate(1).images.images[0]
        spec = optimization_pb2.JobSpec(
            inversion=optimization_pb2.InversionSpec(
                targets=[target],
                generator=self.generator,
                budget=optimization_pb2.Budget(
                    unit=optimization_pb2.BUDGET_UNIT_ITERATIONS, amount=self.options.inversion_steps
                ),
                seed=self.random.getrandbits(32),
            ),
            labels={"source": "locust"},
        )
        start = time.perf_counter()
        submitted = self.optimization.SubmitJob(
            optimization_pb2.SubmitJobRequest(spec=spec), metadata=self.metadata, timeout=CALL_TIMEOUT_S
        )
        state = optimization_pb2.JOB_STATE_UNSPECIFIED
        stream = self.optimization.WatchJob(
            optimization_pb2.WatchJobRequest(job_id=submitted.job_id, skip_previews=True),
            metadata=self.metadata,
            timeout=self.options.job_timeout,
        )
        for event in stream:
            if event.HasField("state_change"):
                state = event.state_change.state
        failure = None
        if state != optimization_pb2.JOB_STATE_SUCCEEDED:
            failure = RuntimeError(f"job {submitted.job_id} ended {optimization_pb2.JobState.Name(state)}")
        self.environment.events.request.fire(
            request_type="job",
            name="inversion",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0,
            response=None,
            context={},
            exception=failure,
        )
        if failure is None:
            self.optimization.GetResult(
                optimization_pb2.GetResultRequest(job_id=submitted.job_id),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT_S,
            )
