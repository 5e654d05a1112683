"""The generated gRPC stubs, taken from the SDK: the server depends on the SDK for its wire protocol, never the
other way round. Server modules import them from here, e.g. `from gansteer_server.proto import generation_pb2`.
"""

from gansteer.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    optimization_pb2,
    optimization_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)

__all__ = [
    "common_pb2",
    "generation_pb2",
    "generation_pb2_grpc",
    "optimization_pb2",
    "optimization_pb2_grpc",
    "scoring_pb2",
    "scoring_pb2_grpc",
]
