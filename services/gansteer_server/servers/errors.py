"""The interceptor that turns the shared `ServiceError` (`wire/errors.py`) into a gRPC status.

A servicer raises `ServiceError(code, message, field)`; the interceptor answers with that status, the field in
front of the message (`latents.data: has 12 bytes, ...`) and an `ErrorDetails` message in the trailing metadata key
`gansteer-error-details-bin` (common.proto). Errors of the layers below are translated once (`wire.errors.translate`).
Anything else is a bug: INTERNAL, with the traceback logged under an id the client sees, and the server keeps
serving.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from gansteer_server.proto import common_pb2
from gansteer_server.wire.errors import ServiceError, translate

logger = logging.getLogger(__name__)

ERROR_DETAILS_KEY = "gansteer-error-details-bin"


class ErrorInterceptor(grpc.ServerInterceptor):
    """Translates errors into statuses, inside the interceptor that measures and logs each call (`calls.py`)."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        return wrap_handler(handler, lambda behaviour, streaming: self._guard(details.method, behaviour, streaming))

    def _guard(self, method: str, behaviour: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        if streaming:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behaviour(request, context)
                except BaseException as error:  # every error becomes a status, never a crash
                    self._abort(context, error, method)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behaviour(request, context)
            except BaseException as error:
                self._abort(context, error, method)

        return unary

    def _abort(self, context: grpc.ServicerContext, error: BaseException, method: str) -> None:
        if isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise error
        if _is_abort(context):
            raise error  # an abort raised below this interceptor already carries its status
        if not context.is_active():
            # The client cancelled or its deadline passed (a request stream then raises RpcError): nobody is
            # listening for a status any more, and nothing went wrong on the server. Aborting (rather than returning
            # None) ends the call without grpc trying to serialize a missing response and logging it as an ERROR.
            logger.debug("%s ended by the client: %r", method, error)
            context.abort(grpc.StatusCode.CANCELLED, "the call ended on the client's side")
        service_error = translate(error)
        if service_error is None:
            incident = uuid.uuid4().hex[:12]
            logger.error(
                "internal error in %s (incident %s)", method, incident, exc_info=error, extra={"incident": incident}
            )
            service_error = ServiceError(
                grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); the server logged it", "", "INTERNAL"
            )
        else:  # the call's own log line (calls.py) says it at INFO, with the message cut short
            logger.debug(
                "refused %s: %s %s",
                method,
                service_error.code.name,
                service_error.status_message,
                extra={"method": method, "code": service_error.code.name, "field": service_error.field},
            )
        context.set_trailing_metadata(((ERROR_DETAILS_KEY, service_error.details().SerializeToString()),))
        context.abort(service_error.code, service_error.status_message)


def _is_abort(context: grpc.ServicerContext) -> bool:
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code != grpc.StatusCode.OK


def wrap_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any], bool], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour replaced by `wrap(behaviour, response_streaming)`."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), **kwargs)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), **kwargs)


def error_details(error: grpc.RpcError) -> list[common_pb2.ErrorDetail]:
    """The ErrorDetail entries a gansteer server attached to a failed call (client side; empty when none)."""
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == ERROR_DETAILS_KEY:
            return list(common_pb2.ErrorDetails.FromString(value).details)
    return []
