"""Every call observed once, by the outermost interceptor: in-flight and finished-call metrics, a request id, and
one structured log line.

The request id is the caller's `x-request-id` metadata when that is a short token (1 to 64 of `A-Za-z0-9._:-`),
else a new one; it goes back to the caller in the trailing metadata under the same key (on errors too), and into
the call's log line, at INFO:

    {"message": "/gansteer.v1.GenerationService/Generate OK 3.1 ms", "service": "generation", "method": "Generate",
     "code": "OK", "duration_ms": 3.1, "request_id": "4f1c...", "peer": "ipv4:127.0.0.1:50312"}

A failed call adds `details`, its status message cut to `MAX_DETAILS` characters: messages may quote what the
caller sent, and a log line stays bounded. Request bodies are never logged. Health checks and reflection log at
DEBUG, so probes every few seconds do not drown the calls that matter.
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from gansteer_server.servers.errors import wrap_handler
from gansteer_server.servers.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
MAX_DETAILS = 200
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_QUIET = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_current = contextvars.ContextVar("gansteer_request_id", default="")


def current_request_id() -> str:
    """The id of the call this thread is handling ("" outside a call), for servicers' own log lines."""
    return _current.get()


def request_id(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's `x-request-id` when it is a short token, else a new random one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            text = value if isinstance(value, str) else value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
            break
    return secrets.token_hex(8)


@dataclass
class _Call:
    method: str  # full name, /package.Service/Method
    short: str
    request_id: str
    started: float


class CallInterceptor(grpc.ServerInterceptor):
    """Outermost: counts the call in flight, then logs and measures it with the status the inner layers gave it."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method, rid = details.method, request_id(details.invocation_metadata)
        return wrap_handler(handler, lambda behaviour, streaming: self._observed(method, rid, behaviour, streaming))

    def _observed(self, method: str, rid: str, behaviour: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        if streaming:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                call = self._begin(method, rid)
                try:
                    yield from behaviour(request, context)
                finally:
                    self._end(call, context)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            call = self._begin(method, rid)
            try:
                return behaviour(request, context)
            finally:
                self._end(call, context)

        return unary

    def _begin(self, method: str, rid: str) -> _Call:
        call = _Call(method, method.rsplit("/", 1)[-1], rid, time.perf_counter())
        _current.set(rid)
        self.metrics.call_started(call.short)
        return call

    def _end(self, call: _Call, context: grpc.ServicerContext) -> None:
        seconds = time.perf_counter() - call.started
        code = context.code() or grpc.StatusCode.OK
        self.metrics.call_finished(call.short, code, seconds)
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), (REQUEST_ID_KEY, call.request_id)))
        if _current.get() == call.request_id:
            _current.set("")
        level = logging.DEBUG if call.method.startswith(_QUIET) else logging.INFO
        if not logger.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "service": self.metrics.service,
            "method": call.short,
            "code": code.name,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": call.request_id,
            "peer": context.peer(),
        }
        if code is not grpc.StatusCode.OK:
            details = context.details() or ""
            text = details if isinstance(details, str) else details.decode(errors="replace")
            fields["details"] = text if len(text) <= MAX_DETAILS else text[: MAX_DETAILS - 3] + "..."
        logger.log(level, "%s %s %.1f ms", call.method, code.name, seconds * 1000, extra=fields)
