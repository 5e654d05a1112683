"""The job machinery's knobs: limits on specs, segment size, leases, delivery cap, event stream length.

They derive from the deployment's `Settings` (Redis URL, result TTL, image limits) plus values that only the jobs
need. The defaults keep every Celery task far below the broker's visibility timeout, which is the point of running a
job in segments (ARCHITECTURE decision 6): an unacknowledged task older than the timeout is delivered again even
while its first copy still runs (celery #5935).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gansteer_server.config import Settings


@dataclass(frozen=True)
class JobSettings:
    """Everything the optimization service and the workers must agree on; build with `JobSettings.create`."""

    settings: Settings
    # Redis: every key the job store writes starts with this prefix; Celery's keys start with `<prefix>celery:`.
    key_prefix: str = "gansteer:"
    # The broker; empty: settings.redis_url (`memory://` there gives Celery's in-process transport).
    broker_url: str = ""
    # Spec limits, checked at SubmitJob.
    max_budget: int = 100_000
    max_restarts: int = 64
    max_population: int = 1024
    # Most images one step of a job may evaluate together (targets x restarts x population).
    max_step_batch: int = 4096
    max_time_limit_s: float = 24 * 3600.0
    max_labels: int = 32
    max_label_chars: int = 256
    # Segmented execution: a task runs at most this many steps or seconds, checkpoints and re-enqueues itself.
    segment_steps: int = 200
    segment_seconds: float = 30.0
    # A worker's claim on a job; renewed while it runs (every third of it), so a second copy of a task stands down.
    lease_s: float = 60.0
    # Deliveries of one segment before the job is failed: a task that kills its worker every time would otherwise
    # be re-queued forever by reject_on_worker_lost (celery #9082).
    max_deliveries: int = 3
    # Broker: unacknowledged tasks come back after this many seconds (a killed worker's task is re-delivered).
    visibility_timeout_s: float = 600.0
    restore_interval_s: float = 10.0
    # Event streams keep at most this many events (XADD MAXLEN ~); progress events at most one per interval.
    events_maxlen: int = 10_000
    progress_interval_s: float = 0.25
    # The optimization service looks for jobs no task carries this often (0: never); see `jobs/sweeper.py`.
    sweep_interval_s: float = 60.0
    # How long a round waits for feedback when its kind sets no expiry (a person may answer the next day).
    round_expiry_s: float = 24 * 3600.0
    # Feature extractor of criteria when a spec names none (the built-in classifier's features).
    default_feature_extractor: str = "scenes-clf"

    def __post_init__(self) -> None:
        if self.segment_seconds * 3 > self.visibility_timeout_s:
            raise ValueError(
                f"segment_seconds {self.segment_seconds} must stay well under visibility_timeout_s "
                f"{self.visibility_timeout_s} (at most a third), or running tasks are delivered twice"
            )
        if self.lease_s <= 0 or self.segment_steps < 1 or self.max_deliveries < 1:
            raise ValueError("lease_s, segment_steps and max_deliveries must be positive")

    @classmethod
    def create(cls, settings: Settings | None = None, **overrides: Any) -> JobSettings:
        """From `settings` (default: `Settings.from_env()`: the `GANSTEER_JOB_*` variables) and keyword overrides
        of the fields above."""
        settings = settings if settings is not None else Settings.from_env()
        from_environment = {
            "max_budget": settings.job_max_budget,
            "max_time_limit_s": float(settings.job_max_time_limit_s),
            "segment_steps": settings.job_segment_steps,
            "segment_seconds": float(settings.job_segment_seconds),
            "max_deliveries": settings.job_max_deliveries,
            "round_expiry_s": float(settings.job_round_expiry_s),
            "sweep_interval_s": float(settings.job_sweep_interval_s),
            "visibility_timeout_s": float(settings.broker_visibility_timeout_s),
        }
        return cls(settings=settings, **(from_environment | overrides))

    def replace(self, **changes: Any) -> JobSettings:
        return dataclasses.replace(self, **changes)

    @property
    def broker(self) -> str:
        return self.broker_url or self.settings.redis_url

    @property
    def result_ttl_s(self) -> int:
        return self.settings.job_result_ttl_s

    @property
    def celery_key_prefix(self) -> str:
        return f"{self.key_prefix}celery:"
