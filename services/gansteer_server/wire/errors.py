"""Errors every layer shares: `ServiceError` carries a gRPC status code, a sentence for a person, the request field
at fault and a stable reason code. Validation, job kinds and servicers raise it; the servers' interceptor turns it
into a status (`servers/errors.py`). Errors of the layers below (an unknown model, a bad scorer parameter) are
translated here once (`translate`), so no caller repeats the mapping.
"""

from __future__ import annotations

import grpc
import redis
from kombu.exceptions import OperationalError

from gansteer_server.algorithms import scorers
from gansteer_server.models import ModelNotFound, ModelRegistryError, ModelUnavailable
from gansteer_server.proto import common_pb2

_DEFAULT_REASONS = {
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_ARGUMENT",
    grpc.StatusCode.NOT_FOUND: "NOT_FOUND",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    grpc.StatusCode.FAILED_PRECONDITION: "FAILED_PRECONDITION",
    grpc.StatusCode.UNAUTHENTICATED: "UNAUTHENTICATED",
    grpc.StatusCode.UNAVAILABLE: "UNAVAILABLE",
    grpc.StatusCode.CANCELLED: "CANCELLED",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
}


#: Longest message and field path an error carries; longer ones are cut, with their length said.
MAX_MESSAGE_CHARS = 500
MAX_FIELD_CHARS = 200


def capped(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ServiceError(Exception):
    """A request the service refuses: the gRPC status code, a sentence for a person and the request field at
    fault (a path like `condition.class_ids.ids[3]`; empty when no one field is), plus a stable `reason` code."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "", reason: str = "") -> None:
        self.code = code
        # Messages and fields may echo request text: capped, so a huge value cannot swell a status, the error
        # trailer past the metadata limit, or the logs.
        self.message = capped(message, MAX_MESSAGE_CHARS)
        self.field = capped(field, MAX_FIELD_CHARS)
        self.reason = reason or _DEFAULT_REASONS.get(code, code.name)
        super().__init__(self.status_message)

    @property
    def status_message(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def details(self) -> common_pb2.ErrorDetails:
        return common_pb2.ErrorDetails(
            details=[common_pb2.ErrorDetail(field=self.field, reason=self.reason, message=self.message)]
        )


def invalid_argument(field: str, message: str, reason: str = "INVALID_ARGUMENT") -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, field, reason)


def not_found(field: str, message: str, reason: str = "NOT_FOUND") -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message, field, reason)


def from_value_error(error: ValueError, reason: str = "INVALID_ARGUMENT") -> ServiceError:
    """INVALID_ARGUMENT from a ValueError whose text starts with `field: ` (as `gansteer.tensors` raises them)."""
    field, sep, message = str(error).partition(": ")
    if not sep or " " in field:
        return invalid_argument("", str(error), reason)
    return invalid_argument(field, message, reason)


def translate(error: BaseException) -> ServiceError | None:
    """The ServiceError for an error of a lower layer the client caused or can act on; None for a bug."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, ModelNotFound):
        return not_found("model", error.message, "UNKNOWN_MODEL")
    if isinstance(error, ModelRegistryError):
        if error.field == "ref":  # a malformed reference is the client's text
            return invalid_argument("model", error.message, "BAD_MODEL_REF")
        # A broken card or weight file on the server: the client cannot fix it, the operator can (the server's logs
        # name the path; the client is told the file's name only).
        where = f" ({error.path.name})" if error.path is not None else ""
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"{error.message}{where}", "model", "BROKEN_MODEL")
    if isinstance(error, ModelUnavailable):
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, error.message, "model", error.reason)
    if isinstance(error, redis.RedisError):
        message = "the job store (Redis) is unavailable; retry shortly"
        return ServiceError(grpc.StatusCode.UNAVAILABLE, message, "", "STORE_UNAVAILABLE")
    if isinstance(error, OperationalError):
        message = "the job queue (the broker) is unavailable; retry shortly"
        return ServiceError(grpc.StatusCode.UNAVAILABLE, message, "", "BROKER_UNAVAILABLE")
    if isinstance(error, scorers.UnknownOutputError):
        return not_found(error.field, error.message, "UNKNOWN_OUTPUT")
    if isinstance(error, scorers.ScorerInputError):
        return invalid_argument(error.field, error.message, "BAD_SCORER_INPUT")
    return None
