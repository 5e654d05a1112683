"""Server reflection under both names clients ask for: `grpc.reflection.v1` (grpcurl, Postman and current tools try it
first) and `grpc.reflection.v1alpha` (older tools).

grpcio-reflection ships only the v1alpha service. The v1 protocol is the same messages under another package name
(grpc/reflection/v1/reflection.proto, field for field), so the v1alpha servicer answers v1 calls unchanged: the
wire bytes are identical and only the method path differs.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = reflection.SERVICE_NAME


def enable_reflection(server: grpc.Server, services: Iterable[str]) -> None:
    """Serve reflection for `services` (and for reflection itself) under v1 and v1alpha."""
    servicer = reflection.ReflectionServicer((*services, V1_SERVICE, V1ALPHA_SERVICE))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": v1_method}),)
    )
