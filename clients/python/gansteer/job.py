"""A handle on one job of the optimization service: watch it, wait for it, cancel it, fetch its result.

A `Job` is only an id and a client: it holds no state of its own, so any process can re-attach to a job with
`client.job(job_id)` and see exactly what the submitter sees. Waiting follows the job's event stream (not polling),
and the stream resumes after the last event seen when a connection breaks, so no progress is missed or repeated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from PIL import Image as PILImage

from gansteer._convert import batch_to_pil
from gansteer._progress import ProgressBar
from gansteer.errors import JobCancelled, JobFailed
from gansteer.types import JobEvent, JobResult, JobState, JobStatus, ProgressEvent, StateChanged
from gansteer.v1 import common_pb2, optimization_pb2

if TYPE_CHECKING:
    from gansteer.client import Client


class Job:
    """A submitted job. `id` identifies it across processes; `kind` is its JobSpec kind (e.g. `inversion`)."""

    def __init__(self, client: Client, job_id: str, *, kind: str = "") -> None:
        self.id = job_id
        self.kind = kind
        self._client = client

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, kind={self.kind!r})"

    def status(self) -> JobStatus:
        """The job's record now: state, step, latest criterion values, error."""
        return self._client.get_job(self.id)

    def watch(self, *, after_event_id: str = "", previews: bool = True) -> Iterator[JobEvent]:
        """The job's events in order (StateChanged, ProgressEvent, PreviewEvent, ResultEvent...) from its first,
        or after `after_event_id`, until the final state change. Reconnects transparently."""
        return self._client.watch_job(self.id, after_event_id=after_event_id, previews=previews, kind=self.kind)

    def wait(self, *, progress: bool = True, timeout: float | None = None) -> JobStatus:
        """Blocks until the job ends and returns its final record.

        `progress` shows a bar with the step, the criterion and the rate. Raises JobFailed (JobCancelled for a
        cancelled job) when it did not succeed, and DeadlineExceeded after `timeout` seconds (the job goes on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with ProgressBar(f"{self.kind or 'job'} {self.id[:12]}", enabled=progress) as bar:
            events = self._client.watch_job(self.id, previews=False, kind=self.kind, deadline=deadline)
            for event in events:
                if isinstance(event, ProgressEvent):
                    bar.update(event.step, event.total_steps, event.criterion, event.elapsed_s)
                elif isinstance(event, StateChanged) and event.state.terminal:
                    break
        status = self.status()
        if status.state == JobState.CANCELLED:
            raise JobCancelled(status)
        if status.state != JobState.SUCCEEDED:
            raise JobFailed(status)
        return status

    def spec(self) -> optimization_pb2.JobSpec:
        """The spec as submitted (the wire message; for kinds the SDK has no typed helper for yet)."""
        return self._client.get_job_spec(self.id)

    def targets(self) -> list[PILImage.Image]:
        """An inversion job's target images as submitted (before the server resized them); empty for other kinds."""
        spec = self.spec()
        if spec.WhichOneof("kind") != "inversion":
            return []
        return batch_to_pil(common_pb2.ImageBatch(images=spec.inversion.targets))

    def cancel(self, reason: str = "") -> JobStatus:
        """Asks the job to stop (the worker checks every step); cancelling a finished job changes nothing."""
        return self._client.cancel_job(self.id, reason)

    def result(self, *, wait: bool = True, progress: bool = False) -> JobResult:
        """The result (an InversionResult for inversion jobs): PIL images, numpy latents, metrics, the curve.

        With `wait` (the default) blocks until the job ends first; without it, a job that has not succeeded raises
        FailedPrecondition.
        """
        if wait:
            self.wait(progress=progress)
        return self._client.get_result(self.id, kind=self.kind)
