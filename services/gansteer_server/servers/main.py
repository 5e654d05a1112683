"""Console entry points `gansteer-generation`, `gansteer-scoring` and `gansteer-optimization`: one service per
process, configured by the `GANSTEER_*` environment (see `gansteer_server.config`), JSON logs on stderr, graceful
stop on SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from typing import Any

import torch

from gansteer_server.config import ConfigError, Settings, settings_table
from gansteer_server.logs import configure_logging
from gansteer_server.servers.app import DEFAULT_GRACE_S, RunningService, start_generation_server, start_scoring_server


def _start(service: str, settings: Settings) -> RunningService | Any:
    if service == "optimization":  # imported here: the jobs API pulls in Celery, which the model services do not need
        from gansteer_server.servers.optimization import start_optimization_server

        return start_optimization_server(settings)
    return (start_generation_server if service == "generation" else start_scoring_server)(settings)


def generation() -> None:
    """`gansteer-generation`: the generation service."""
    sys.exit(_serve("generation", sys.argv[1:]))


def scoring() -> None:
    """`gansteer-scoring`: the scoring service."""
    sys.exit(_serve("scoring", sys.argv[1:]))


def optimization() -> None:
    """`gansteer-optimization`: the optimization service (the jobs API)."""
    sys.exit(_serve("optimization", sys.argv[1:]))


def _serve(service: str, argv: list[str]) -> int:
    settings_help = "\n".join(f"  {row.variable} (default {row.default or 'empty'})" for row in settings_table())
    parser = argparse.ArgumentParser(
        prog=f"gansteer-{service}",
        description=f"Run gansteer's {service} service. Configured by environment variables:\n{settings_help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds to finish in-flight calls")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        print(f"gansteer-{service}: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    running = _start(service, settings)
    # Move everything imported so far (torch, onnxruntime, grpc: ~180k objects) out of the garbage collector's
    # reach: a full collection over them paused serving for ~90 ms, which set the p99 latency of batched requests.
    gc.freeze()
    logging.getLogger(__name__).info(
        "serving %s on %s (torch threads %d)",
        service,
        running.address,
        torch.get_num_threads(),
        extra={"torch_threads": torch.get_num_threads()},
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    running.stop(args.grace)
    return 0
