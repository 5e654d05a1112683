#!/usr/bin/env python3
"""`gansteer-healthcheck`: the container images' health check, one command for every role.

    gansteer-healthcheck                  # the role of the container's main process (PID 1), on its default port
    gansteer-healthcheck grpc 50051       # grpc.health.v1 Check("") answers SERVING
    gansteer-healthcheck http 8080        # GET /healthz answers 200 (the rounds page)
    gansteer-healthcheck worker [NODE]    # the Celery worker NODE (default gansteer@<hostname>) answers a ping

Exit status 0: healthy; 1: not. Kubernetes probes the services natively (`grpc:` probes) and runs only the worker
check through this script; Docker and compose run it for every role. The worker check goes through the broker, so
it says that the worker's consumer loop runs and reaches Redis, not merely that the process exists.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from collections.abc import Sequence

TIMEOUT_S = 5.0

# The role of each console script, and the variable and default of the port its check reaches.
ROLES = {
    "gansteer-generation": ("grpc", "GANSTEER_GENERATION_PORT", "50051"),
    "gansteer-scoring": ("grpc", "GANSTEER_SCORING_PORT", "50052"),
    "gansteer-optimization": ("grpc", "GANSTEER_OPTIMIZATION_PORT", "50053"),
    "gansteer-web": ("http", "GANSTEER_WEB_PORT", "8080"),
    "gansteer-worker": ("worker", "", ""),
}


def check_grpc(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            print(f"grpc health on port {port}: {error.code().name}", file=sys.stderr)
            return False
    print(f"grpc health on port {port}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def check_http(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT_S) as response:
            ok = response.status == 200
    except OSError as error:
        print(f"http health on port {port}: {error}", file=sys.stderr)
        return False
    print(f"http health on port {port}: {'ok' if ok else 'failed'}")
    return ok


def check_worker(node: str) -> bool:
    from kombu.exceptions import OperationalError

    from gansteer_server.config import Settings
    from gansteer_server.jobs.celery_app import Jobs
    from gansteer_server.jobs.settings import JobSettings

    celery = Jobs(JobSettings.create(Settings.from_env())).celery
    try:
        replies = celery.control.ping(destination=[node], timeout=TIMEOUT_S)
    except OperationalError as error:  # the broker is unreachable
        print(f"worker {node}: {error}", file=sys.stderr)
        return False
    ok = any(node in reply for reply in replies)
    print(f"worker {node}: {'pong' if ok else 'no answer'}")
    return ok


def main_process_args() -> list[str]:
    """PID 1's command line (the container's main process), split into its arguments."""
    with open("/proc/1/cmdline", "rb") as file:
        return [part.decode(errors="replace") for part in file.read().split(b"\0") if part]


def role_of(args: Sequence[str]) -> tuple[str, str]:
    """(kind of check, its argument) for a gansteer process started with `args`."""
    for arg in args:
        script = os.path.basename(arg)
        if script in ROLES:
            kind, variable, default = ROLES[script]
            if kind == "worker":
                return kind, _option(args, "--hostname") or f"gansteer@{socket.gethostname()}"
            return kind, _option(args, "--port") or os.environ.get(variable) or default
    raise SystemExit(f"gansteer-healthcheck: no gansteer process in {' '.join(args)!r}; name the check to run")


def _option(args: Sequence[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return ""


def main(argv: Sequence[str]) -> int:
    kind, target = (argv[0], argv[1] if len(argv) > 1 else "") if argv else role_of(main_process_args())
    if kind == "grpc":
        return 0 if check_grpc(int(target)) else 1
    if kind == "http":
        return 0 if check_http(int(target)) else 1
    if kind == "worker":
        return 0 if check_worker(target or f"gansteer@{socket.gethostname()}") else 1
    raise SystemExit(f"gansteer-healthcheck: unknown check {kind!r}; expected grpc, http or worker")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
