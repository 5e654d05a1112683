"""API keys: every call carries `authorization: Bearer <key>` metadata with one of the configured keys.

Auth is off only when the settings say so (`Settings.auth_disabled`, which refuses a non-loopback bind without
keys unless `GANSTEER_AUTH=off`). Health checks pass without a key, so a load balancer or Kubernetes probe needs no
secret; reflection does not, since it lists the whole API.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from gansteer_server.servers.errors import wrap_handler
from gansteer_server.wire.errors import ServiceError

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_SCHEME = "bearer "


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid key with UNAUTHENTICATED (the key is never logged or echoed)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys if k)
        if not self._keys:
            raise ValueError("ApiKeyInterceptor needs at least one key; leave it out to run without auth")

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        problem = self._problem(details.invocation_metadata or ())
        if problem is None:
            return handler
        return wrap_handler(handler, lambda _behaviour, streaming: _refuse(problem, streaming))

    def _problem(self, metadata: Iterable[tuple[str, Any]]) -> str | None:
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return "missing `authorization: Bearer <key>` metadata"
        key = bearer_key(metadata)
        if key is None:
            return "the authorization metadata must read `Bearer <key>`"
        # Compare against every key in constant time, so timing says nothing about which prefix matched.
        matched = False
        for known in self._keys:
            matched |= hmac.compare_digest(key, known)
        return None if matched else "unknown API key"


def bearer_key(metadata: Iterable[tuple[str, Any]]) -> bytes | None:
    """The key of the first `authorization: Bearer <key>` metadata entry, or None when there is none."""
    for name, value in metadata:
        if name == "authorization":
            text = value if isinstance(value, str) else value.decode("latin-1")
            return text[len(_SCHEME) :].strip().encode() if text.lower().startswith(_SCHEME) else None
    return None


def caller_id(context: grpc.ServicerContext, auth_enabled: bool) -> str:
    """The owner of the calling API key, a short hash of it (the interceptor has checked the key); "" with auth
    off. Jobs are recorded under it, so a caller lists and reads only its own."""
    if not auth_enabled:
        return ""
    key = bearer_key(context.invocation_metadata() or ())
    if key is None:
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing API key", "authorization", "UNAUTHENTICATED")
    return f"key-{hashlib.sha256(key).hexdigest()[:16]}"


def _refuse(problem: str, streaming: bool) -> Callable[..., Any]:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, problem, "authorization", "UNAUTHENTICATED")

    if not streaming:
        return refuse

    def refuse_stream(request: Any, context: grpc.ServicerContext) -> Any:
        yield refuse(request, context)

    return refuse_stream
