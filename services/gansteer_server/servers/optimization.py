"""The optimization service: the jobs API (optimization.proto). It validates specs, records jobs, queues their tasks,
streams their events, cancels them and serves their results. It never runs a model itself; it reads model cards
to validate specs.

Callers are told apart by API key: with auth on, a job belongs to the key that submitted it (the owner is a hash
of the key, never the key), and every method sees only the caller's own jobs (another caller's job is NOT_FOUND).
With auth off there is one owner, the empty one, and every job is visible.

    gansteer-optimization           # the service, configured by GANSTEER_* (see gansteer_server.config)
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health

from gansteer.tensors import from_tensor_proto
from gansteer_server.algorithms.search import optimizer_catalog
from gansteer_server.config import Settings
from gansteer_server.jobs.celery_app import Jobs, probe_redis
from gansteer_server.jobs.impressions import DATASET, ImpressionStore, check_records
from gansteer_server.jobs.kinds import SubmitContext, get_kind, kind_names
from gansteer_server.jobs.metrics import JobMetrics
from gansteer_server.jobs.records import JobRecord, JobState
from gansteer_server.jobs.round_store import AnswerOutcome, RoundStore
from gansteer_server.jobs.rounds import check_answer, interaction, pseudonym
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.jobs.sweeper import Sweeper
from gansteer_server.models import ModelRegistry
from gansteer_server.models.store import ModelStore
from gansteer_server.proto import common_pb2, optimization_pb2_grpc
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.servers.app import new_grpc_server, serve_grpc
from gansteer_server.servers.auth import caller_id
from gansteer_server.servers.calls import current_request_id
from gansteer_server.servers.metrics import ServiceMetrics
from gansteer_server.servers.readiness import Check, Readiness
from gansteer_server.wire.convert import image_batch
from gansteer_server.wire.errors import ServiceError, invalid_argument, not_found

logger = logging.getLogger(__name__)

OPTIMIZATION_SERVICE = opt.DESCRIPTOR.services_by_name["OptimizationService"].full_name
DEFAULT_GRACE_S = 10.0
MAX_PAGE_SIZE = 500
_WATCH_POLL_MS = 1000
_EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_JOB_ID = re.compile(r"[0-9a-f]{24}")
_STATES = {state.proto: state for state in JobState}


class OptimizationServicer(optimization_pb2_grpc.OptimizationServiceServicer):
    """Validation and translation around `Jobs` (submission) and `JobStore` (records, events, results)."""

    def __init__(self, jobs: Jobs, catalog: ModelStore) -> None:
        self.jobs, self.store, self.settings = jobs, jobs.store, jobs.settings
        self.context = SubmitContext(jobs.settings, catalog)
        self.rounds = RoundStore(self.store)
        self.impressions = ImpressionStore(self.store.client, self.store.prefix)

    # --- helpers ----------------------------------------------------------------------------------------------

    def _owner(self, context: grpc.ServicerContext) -> str:
        return caller_id(context, self.settings.settings.auth_enabled)

    def _record(self, job_id: str, context: grpc.ServicerContext) -> tuple[JobRecord, str]:
        """The caller's job and its newest event id; NOT_FOUND for unknown, expired or another caller's jobs."""
        if not _JOB_ID.fullmatch(job_id):
            shown = repr(job_id) if len(job_id) <= 64 else f"a text of {len(job_id)} characters"
            raise invalid_argument("job_id", f"{shown} is not a job id (24 hex digits)", "BAD_JOB_ID")
        found = self.store.get_with_last_event([job_id])[0]
        if found is None or found[0].owner != self._owner(context):
            raise not_found("job_id", f"no job {job_id} (unknown, or its record expired)", "UNKNOWN_JOB")
        return found

    def _job(self, record: JobRecord, last_event_id: str, view: int) -> opt.Job:
        job = record.to_proto(last_event_id)
        if record.state is JobState.WAITING:
            pending = self.rounds.pending_round(record.id)
            if pending is not None:
                pending.answers_received = record.round_answers
                job.pending_round.CopyFrom(pending)
        if view == opt.JOB_VIEW_FULL:
            stored = self.store.spec(record.id)
            if stored is not None and stored[0]:
                job.spec.ParseFromString(stored[0])
        return job

    # --- the API ----------------------------------------------------------------------------------------------

    def SubmitJob(self, request: opt.SubmitJobRequest, context: grpc.ServicerContext) -> opt.SubmitJobResponse:
        spec, limits = request.spec, self.settings
        owner = self._owner(context)
        if spec.idempotency_key:
            if len(spec.idempotency_key) > 256:
                raise invalid_argument("spec.idempotency_key", "at most 256 characters")
            earlier = self.store.find_idempotent(owner, spec.idempotency_key)
            if earlier is not None:
                self._same_spec(earlier, spec)
                return opt.SubmitJobResponse(job_id=earlier.id, existing=True, job=earlier.to_proto())
        kind_name = spec.WhichOneof("kind")
        if kind_name is None:
            raise invalid_argument("spec.kind", "set one job kind (e.g. `inversion`)", "MISSING_KIND")
        if kind_name not in kind_names():
            raise ServiceError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"job kind {kind_name!r} is not available on this server (available: {', '.join(kind_names())})",
                f"spec.{kind_name}",
                "UNKNOWN_KIND",
            )
        if not 0 <= spec.priority <= 9:
            raise invalid_argument("spec.priority", f"must be 0 to 9, got {spec.priority}")
        if not (math.isfinite(spec.time_limit_s) and 0 <= spec.time_limit_s <= limits.max_time_limit_s):
            limit = limits.max_time_limit_s
            message = f"must be 0 (the server's limit) to {limit:g} seconds, got {spec.time_limit_s}"
            raise invalid_argument("spec.time_limit_s", message)
        if spec.preview_every < 0:
            raise invalid_argument("spec.preview_every", f"must be 0 (none) or positive, got {spec.preview_every}")
        if len(spec.labels) > limits.max_labels:
            raise invalid_argument("spec.labels", f"at most {limits.max_labels} labels, got {len(spec.labels)}")
        for key, value in spec.labels.items():
            if not key or len(key) > limits.max_label_chars or len(value) > limits.max_label_chars:
                message = f"keys need 1 to {limits.max_label_chars} characters, values at most as many"
                raise invalid_argument(f"spec.labels[{key!r}]", message)
        kind = get_kind(kind_name)
        parsed = kind.parse(getattr(spec, kind_name), self.context)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # the client gave up while the spec was checked: create nothing
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before the job was created", "", ""
            )
        record, existing = self.jobs.submit(
            kind,
            parsed,
            owner=owner,
            spec_proto=spec.SerializeToString(deterministic=True),
            priority=spec.priority,
            time_limit_s=spec.time_limit_s,
            preview_every=spec.preview_every,
            labels=dict(spec.labels),
            idempotency_key=spec.idempotency_key,
        )
        logger.info(
            "job %s (%s) queued",
            record.id,
            kind_name,
            extra={"job_id": record.id, "kind": kind_name, "request_id": current_request_id()},
        )
        return opt.SubmitJobResponse(job_id=record.id, existing=existing, job=record.to_proto())

    def _close_if_expired(self, record: JobRecord) -> bool:
        """A waiting job whose round expired goes back to the queue to end with its best result (lazily, when a
        caller looks at it); returns whether it did."""
        if record.state is not JobState.WAITING or time.time() <= record.round_expires:
            return False
        closed = self.rounds.close_expired(record.id)
        if closed is not None:
            self.jobs.enqueue(closed, closed.segment)
        return closed is not None

    def _same_spec(self, earlier: JobRecord, spec: opt.JobSpec) -> None:
        """An idempotency key names one spec: a resubmission with another spec is a client bug, not a retry."""
        stored = self.store.spec(earlier.id)
        if stored is not None and stored[0] and stored[0] != spec.SerializeToString(deterministic=True):
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"job {earlier.id} was submitted with this key and another spec; use a new key for a new job",
                "spec.idempotency_key",
                "IDEMPOTENCY_KEY_REUSED",
            )

    def GetJob(self, request: opt.GetJobRequest, context: grpc.ServicerContext) -> opt.GetJobResponse:
        record, last_event = self._record(request.job_id, context)
        if self._close_if_expired(record):
            record, last_event = self._record(request.job_id, context)
        view = request.view or opt.JOB_VIEW_FULL
        return opt.GetJobResponse(job=self._job(record, last_event, view))

    def WatchJob(self, request: opt.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[opt.JobEvent]:
        self._record(request.job_id, context)
        after = request.after_event_id or "0"
        if after != "0" and not _EVENT_ID.fullmatch(after):
            raise invalid_argument("after_event_id", f"{after!r} is not an event id like `1718000000000-0`")
        while context.is_active():
            events = self.store.read_events(request.job_id, after, block_ms=_WATCH_POLL_MS)
            if not events:
                record = self.store.get(request.job_id)
                if record is None or record.state.terminal:
                    return  # the final event was sent before `after`, or the job expired meanwhile
                continue
            for event_id, event in events:
                after = event_id
                if request.skip_previews and event.HasField("preview"):
                    continue
                yield event
                if event.HasField("state_change") and _STATES[event.state_change.state].terminal:
                    return

    def CancelJob(self, request: opt.CancelJobRequest, context: grpc.ServicerContext) -> opt.CancelJobResponse:
        self._record(request.job_id, context)
        if len(request.reason) > 1000:
            raise invalid_argument("reason", "at most 1000 characters")
        cancelled = self.store.request_cancel(request.job_id, request.reason)
        if cancelled is not None and cancelled.state is JobState.QUEUED and cancelled.started:
            self.jobs.enqueue(cancelled, cancelled.segment)  # it was waiting for feedback: a worker ends it
        record, last_event = self._record(request.job_id, context)
        return opt.CancelJobResponse(job=record.to_proto(last_event))

    def ListJobs(self, request: opt.ListJobsRequest, context: grpc.ServicerContext) -> opt.ListJobsResponse:
        owner = self._owner(context)
        size = request.page_size or 50
        if not 0 < size <= MAX_PAGE_SIZE:
            raise invalid_argument("page_size", f"must be 0 (50) to {MAX_PAGE_SIZE}, got {request.page_size}")
        token = request.page_token
        if token and not _JOB_ID.fullmatch(token):
            raise invalid_argument("page_token", "not a token this server gave", "BAD_PAGE_TOKEN")
        states = {_STATES[s] for s in request.states if s in _STATES}
        view = request.view or opt.JOB_VIEW_BASIC
        index_owner = owner if self.settings.settings.auth_enabled else None
        jobs: list[opt.Job] = []
        while len(jobs) < size:
            ids = self.store.list_ids(index_owner, token, limit=size * 2)
            if not ids:
                token = ""
                break
            found = self.store.get_with_last_event(ids)
            self.store.forget(owner, [job_id for job_id, item in zip(ids, found, strict=True) if item is None])
            for job_id, item in zip(ids, found, strict=True):
                token = job_id
                if item is None or not self._matches(item[0], request, states):
                    continue
                jobs.append(self._job(item[0], item[1], view))
                if len(jobs) == size:
                    break
        return opt.ListJobsResponse(jobs=jobs, next_page_token=token if len(jobs) == size else "")

    @staticmethod
    def _matches(record: JobRecord, request: opt.ListJobsRequest, states: set[JobState]) -> bool:
        return (
            (not states or record.state in states)
            and (not request.kind or record.kind == request.kind)
            and all(record.labels.get(k) == v for k, v in request.labels.items())
        )

    def GetResult(self, request: opt.GetResultRequest, context: grpc.ServicerContext) -> opt.GetResultResponse:
        record, _ = self._record(request.job_id, context)
        data = self.store.result(record.id)
        if data is None:
            if record.state is JobState.SUCCEEDED:
                raise not_found("job_id", f"the result of job {record.id} has expired", "RESULT_EXPIRED")
            detail = f": {record.error}" if record.error else ""
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {record.id} is {record.state.value} and has no result{detail}",
                "job_id",
                "NO_RESULT",
            )
        result = opt.JobResult.FromString(data)
        if request.image_format != common_pb2.IMAGE_FORMAT_TENSOR and result.images.HasField("tensor"):
            images = torch.from_numpy(from_tensor_proto(result.images.tensor, copy=True))
            result.images.CopyFrom(image_batch(images, as_png=True))
        return opt.GetResultResponse(result=result)

    def SubmitFeedback(
        self, request: opt.SubmitFeedbackRequest, context: grpc.ServicerContext
    ) -> opt.SubmitFeedbackResponse:
        record, _ = self._record(request.job_id, context)
        if len(request.idempotency_key) > 256 or len(request.rater) > 256:
            field = "idempotency_key" if len(request.idempotency_key) > 256 else "rater"
            raise invalid_argument(field, "at most 256 characters")
        self._close_if_expired(record)
        pending = self.rounds.pending_round(record.id)
        if pending is not None and pending.round_id == request.round_id:
            check_answer(pending, request)
        rater = pseudonym(request.rater or record.owner or "anonymous", self.rounds.rater_key())

        def entry(round_: opt.FeedbackRound, now: float) -> opt.Interaction:
            return interaction(record.id, round_, request, rater, now)

        receipt = self.rounds.record_answer(record.id, request.round_id, rater, request.idempotency_key, entry)
        outcome, current = receipt.outcome, receipt.record
        if outcome is AnswerOutcome.GONE or current is None:
            raise not_found("job_id", f"no job {record.id} (its record expired)", "UNKNOWN_JOB")
        if outcome in (AnswerOutcome.NOT_OPEN, AnswerOutcome.EXPIRED, AnswerOutcome.ALREADY_ANSWERED):
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, _REFUSALS[outcome], "round_id", outcome.name)
        duplicate = outcome is AnswerOutcome.DUPLICATE
        # A resent answer whose job is still queued re-sends the segment: the first send may have failed, and a
        # second message is harmless (the lease and the segment number stand the copy down).
        if receipt.queued or (duplicate and current.state is JobState.QUEUED and current.deliver_round):
            self.jobs.enqueue(current, current.segment)
        record, last_event = self._record(request.job_id, context)
        return opt.SubmitFeedbackResponse(job=self._job(record, last_event, opt.JOB_VIEW_BASIC), duplicate=duplicate)

    def ListInteractions(
        self, request: opt.ListInteractionsRequest, context: grpc.ServicerContext
    ) -> opt.ListInteractionsResponse:
        record, _ = self._record(request.job_id, context)
        return opt.ListInteractionsResponse(interactions=self.rounds.interactions(record.id))

    def ReportImpressions(
        self, request: opt.ReportImpressionsRequest, context: grpc.ServicerContext
    ) -> opt.ReportImpressionsResponse:
        if len(request.idempotency_key) > 256:
            raise invalid_argument("idempotency_key", "at most 256 characters")
        dataset, records = check_records(
            request.records, self.context.model, self._owner(context) or "anonymous", "api"
        )
        recorded, total, duplicate = self.impressions.append(dataset, records, request.idempotency_key)
        return opt.ReportImpressionsResponse(recorded=recorded, total=total, duplicate=duplicate)

    def ListImpressions(
        self, request: opt.ListImpressionsRequest, context: grpc.ServicerContext
    ) -> opt.ListImpressionsResponse:
        if not DATASET.fullmatch(request.dataset):
            raise invalid_argument("dataset", f"{request.dataset!r} is not 1-64 letters, digits, '-', '_', '.'")
        if request.offset < 0:
            raise invalid_argument("offset", f"must be >= 0, got {request.offset}")
        if not 0 <= request.page_size <= 10_000:
            raise invalid_argument("page_size", f"must lie in [0, 10000], got {request.page_size}")
        total = self.impressions.count(request.dataset)
        if total == 0:
            raise not_found("dataset", f"no impressions table {request.dataset!r}", "UNKNOWN_DATASET")
        records = self.impressions.read(request.dataset, int(request.offset), request.page_size or 1000)
        return opt.ListImpressionsResponse(records=records, total=total)

    def ListJobKinds(self, request: opt.ListJobKindsRequest, context: grpc.ServicerContext) -> opt.ListJobKindsResponse:
        return opt.ListJobKindsResponse(kinds=[get_kind(name).info() for name in kind_names()])

    def ListOptimizers(
        self, request: opt.ListOptimizersRequest, context: grpc.ServicerContext
    ) -> opt.ListOptimizersResponse:
        return opt.ListOptimizersResponse(
            optimizers=[
                opt.OptimizerInfo(
                    name=info.name,
                    gradient=info.gradient,
                    description=info.description,
                    default_learning_rate=info.default_learning_rate or 0.0,
                    default_population=info.default_population or 0,
                )
                for info in optimizer_catalog()
            ]
        )


_REFUSALS = {
    AnswerOutcome.NOT_OPEN: "that round is no longer open (answered, expired, or the job moved on)",
    AnswerOutcome.EXPIRED: "that round has expired",
    AnswerOutcome.ALREADY_ANSWERED: "this rater has already answered that round",
}


@dataclass
class RunningOptimizationService:
    """A started optimization service. `stop()` ends watch streams and in-flight calls within the grace period."""

    server: grpc.Server
    port: int
    host: str
    jobs: Jobs
    metrics: ServiceMetrics
    metrics_port: int
    health: health.HealthServicer
    readiness: Readiness

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    sweeper: Sweeper | None = None

    def stop(self, grace: float | None = DEFAULT_GRACE_S) -> None:
        self.readiness.stop()
        self.health.enter_graceful_shutdown()
        if self.sweeper is not None:
            self.sweeper.stop()
        self.server.stop(grace).wait()
        self.metrics.close()


def start_optimization_server(
    settings: Settings | JobSettings,
    port: int | None = None,
    *,
    registry: ModelRegistry | None = None,
    metrics_port: int | None = None,
) -> RunningOptimizationService:
    """The optimization service on `port` (default: settings.optimization_port; 0: any free port)."""
    job_settings = settings if isinstance(settings, JobSettings) else JobSettings.create(settings)
    base = job_settings.settings
    metrics = ServiceMetrics("optimization")
    server = new_grpc_server("optimization", base, metrics)
    jobs = Jobs(job_settings, on_transition=JobMetrics(metrics.registry).observe_transition)
    catalog = ModelStore(registry or ModelRegistry(base.registry_paths))
    optimization_pb2_grpc.add_OptimizationServiceServicer_to_server(OptimizationServicer(jobs, catalog), server)
    host, port = base.host, base.optimization_port if port is None else port
    bound, health_servicer = serve_grpc(server, "optimization", OPTIMIZATION_SERVICE, host, port)
    readiness = Readiness("optimization", health_servicer, OPTIMIZATION_SERVICE, _dependencies(job_settings), metrics)
    readiness.start()
    bound_metrics = metrics.serve(base.optimization_metrics_port if metrics_port is None else metrics_port, host)
    logger.info(
        "optimization service on %s:%d (auth %s, broker %s)",
        host,
        bound,
        "on" if base.auth_enabled else "off",
        job_settings.broker.split("@")[-1],
        extra={"service": "optimization", "port": bound, "metrics_port": bound_metrics},
    )
    sweeper = None
    if job_settings.sweep_interval_s > 0:
        sweeper = Sweeper(jobs.store, job_settings, jobs.enqueue, job_settings.sweep_interval_s)
        sweeper.start()
    return RunningOptimizationService(
        server, bound, host, jobs, metrics, bound_metrics, health_servicer, readiness, sweeper
    )


def _dependencies(settings: JobSettings) -> dict[str, Check]:
    """Readiness checks: the job store's Redis, and the broker's when it is another one."""
    checks: dict[str, Check] = {"redis": probe_redis(settings.settings.redis_url).ping}
    if settings.broker != settings.settings.redis_url and not settings.broker.startswith("memory://"):
        checks["broker"] = probe_redis(settings.broker).ping
    return checks
