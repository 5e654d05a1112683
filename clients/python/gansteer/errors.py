"""The SDK's exceptions: one class per gRPC status a caller may want to branch on, all under `GansteerError`.

A gansteer server refuses a request with a status message naming the field at fault (`spec.inversion.targets[0]:
not a decodable PNG`) and attaches machine-readable `ErrorDetail`s in the trailing metadata key
`gansteer-error-details-bin`. Both reach the caller unchanged, so a script can print `str(error)` for a person and
branch on `error.details[0].reason` for a program. Callers catch `gansteer.InvalidArgument` instead of inspecting
`grpc.RpcError`, and the SDK's own input checks raise the same classes, so one `except` covers both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc  # type: ignore[import-untyped]

from gansteer.v1 import common_pb2

if TYPE_CHECKING:
    from gansteer.types import JobStatus

ERROR_DETAILS_KEY = "gansteer-error-details-bin"


@dataclass(frozen=True)
class ErrorDetail:
    """One problem with a request: the field's path, a stable upper-snake `reason` code and a sentence."""

    field: str
    reason: str
    message: str


class GansteerError(Exception):
    """Base of every error the SDK raises for a refused or failed call.

    `code` is the gRPC status: the server's, or for an error the SDK raises itself before any call (a bad option)
    the status the server would have given (INVALID_ARGUMENT ...), so that callers branch on one thing; None for a
    job that failed. `message` is the text, `details` the `ErrorDetail`s (empty when none were named).
    """

    #: The status an error of this class raised by the SDK itself carries.
    default_code: grpc.StatusCode | None = None

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, details: Sequence[ErrorDetail] = ()
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.details: tuple[ErrorDetail, ...] = tuple(details)

    @property
    def field(self) -> str:
        """The first detail's field path (empty when the server named none)."""
        return self.details[0].field if self.details else ""

    @property
    def reason(self) -> str:
        """The first detail's reason code (empty when the server sent no details)."""
        return self.details[0].reason if self.details else ""


class InvalidArgument(GansteerError, ValueError):
    """The request is malformed: a bad image, an unknown optimizer, a budget out of range."""


class NotFound(GansteerError, LookupError):
    """An unknown model, job or expired result."""


class FailedPrecondition(GansteerError):
    """The request is valid but the target is not in a state to answer it (e.g. the result of an unfinished job)."""


class RoundClosed(FailedPrecondition):
    """An answer to a round that is no longer open: it has the answers it asked for, it expired (the job then ended
    with its best result so far), or this rater answered it already. `job_id` and `round_id` name the round; the
    server's `reason` says which."""

    def __init__(self, message: str, *, job_id: str, round_id: str, details: Sequence[ErrorDetail] = ()) -> None:
        super().__init__(message, code=grpc.StatusCode.FAILED_PRECONDITION, details=details)
        self.job_id = job_id
        self.round_id = round_id


class Unauthenticated(GansteerError):
    """No API key, or one the server does not know."""


class PermissionDenied(GansteerError):
    """The key is valid but may not touch this resource (another caller's job)."""


class ResourceExhausted(GansteerError):
    """A queue or a limit is full; retrying later may succeed."""


class Unavailable(GansteerError):
    """The service could not be reached (after the SDK's retries, for idempotent calls)."""


class DeadlineExceeded(GansteerError):
    """The call took longer than its deadline."""


class Cancelled(GansteerError):
    """The call was cancelled (by the caller or the server shutting down)."""


class Unimplemented(GansteerError):
    """The server does not offer this call (an older server than the SDK)."""


class Internal(GansteerError):
    """A bug or an unexpected status on the server; the message carries the incident id the server logged."""


class JobFailed(GansteerError):
    """A job ended without succeeding; `status` is its final record (state, error and error details)."""

    def __init__(self, status: JobStatus) -> None:
        message = f"job {status.id} {status.state.value}" + (f": {status.error}" if status.error else "")
        super().__init__(message, details=status.error_details)
        self.status = status


class JobCancelled(JobFailed):
    """A job was cancelled before it finished (by `Job.cancel`, another client, or the server)."""


_BY_CODE: dict[grpc.StatusCode, type[GansteerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


for _code, _class in reversed(_BY_CODE.items()):  # the first code listed for a class is its own
    _class.default_code = _code


def error_class(code: grpc.StatusCode) -> type[GansteerError]:
    """The exception class for a status code; codes no caller branches on (UNKNOWN, DATA_LOSS...) are Internal."""
    return _BY_CODE.get(code, Internal)


def parse_details(metadata: Sequence[tuple[str, str | bytes]] | None) -> list[ErrorDetail]:
    """The ErrorDetails a server attached in trailing metadata; empty when absent or unreadable.

    Unreadable details are ignored rather than raised: the status message already says what went wrong, and a
    broken trailer must not hide it.
    """
    for key, value in metadata or ():
        if key != ERROR_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            details = common_pb2.ErrorDetails.FromString(value).details
        except Exception:  # a malformed trailer (protobuf's DecodeError) must not hide the status message
            return []
        return [ErrorDetail(field=d.field, reason=d.reason, message=d.message) for d in details]
    return []


def from_rpc_error(error: grpc.RpcError, *, target: str = "") -> GansteerError:
    """Translate a failed call (sync or asyncio) into the SDK's exception, keeping the server's message and details.

    `target` goes into the message of UNAVAILABLE errors, where the server sent nothing useful and the address is
    what a person needs to check.
    """
    code: grpc.StatusCode = error.code()
    message = str(error.details() or code.name)
    trailing = error.trailing_metadata()
    details = parse_details(list(trailing) if trailing else None)
    if code == grpc.StatusCode.UNAVAILABLE and target:
        message = f"{target} unavailable: {message}"
    return error_class(code)(message, code=code, details=details)
