"""`gansteer up`: the local stack in the foreground until Ctrl-C, for trying gansteer on one machine: the three
services, a worker, and the rounds page (`gansteer-web`, port 8080, or a free port with `--any-port`).

Each service and the worker serve Prometheus metrics (docs/operations.md), on the `GANSTEER_*_METRICS_PORT` ports
(9461-9464), or on free ports with `--any-port`; the ports are printed. `--no-metrics` turns them off.

The server package is imported here, lazily, so the SDK keeps no dependency on it; without it the command says how
to install it. Where jobs travel (a given Redis, a started `redis-server`, or the in-memory transport) is printed,
because a job submitted to an in-memory stack lives only as long as this process.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import threading
from typing import Any

from gansteer.embedded import _INSTALL_HINT


def run_up(*, redis_url: str, transport: str, any_port: bool, json_output: bool, metrics: bool = True) -> int:
    """Starts the stack, prints its addresses, waits for SIGINT or SIGTERM, stops everything; returns 0."""
    try:
        server = importlib.import_module("gansteer_server.embedded")
        # The stack runs in this process: its per-call and per-job log lines (docs/operations.md) go to stderr as the
        # standalone services' do.
        logs, config = (
            importlib.import_module("gansteer_server.logs"),
            importlib.import_module("gansteer_server.config"),
        )
        logs.configure_logging(config.Settings.from_env().log_level)
    except ImportError as error:
        if error.name is not None and not error.name.startswith("gansteer_server"):
            raise
        print(f"gansteer up: {_INSTALL_HINT}", file=sys.stderr)
        return 1
    stopping = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stopping.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack = server.start_stack(
            redis_url=redis_url or None,
            transport=transport,
            free_ports=any_port,
            key_prefix=None,
            metrics=metrics,
        )
    except (OSError, RuntimeError) as error:  # a port in use, a redis-server that would not start, no fakeredis
        _restore(previous)
        print(f"gansteer up: {error}", file=sys.stderr)
        return 1
    except BaseException:
        _restore(previous)
        raise
    web = clients = None
    try:
        from gansteer.web import serve

        web, clients = serve(
            0 if any_port else 8080,
            target=stack.optimization_address,
            generation_target=stack.generation_address,
            scoring_target=stack.scoring_address,
        )
        threading.Thread(target=web.serve_forever, name="gansteer-web", daemon=True).start()
        addresses = {
            "generation": stack.generation_address,
            "scoring": stack.scoring_address,
            "optimization": stack.optimization_address,
            "web": f"http://127.0.0.1:{web.server_address[1]}/",
        }
        metrics_urls = {
            name: f"http://127.0.0.1:{port}/metrics" if port else "off" for name, port in stack.metrics_ports.items()
        }
        if json_output:
            document = {**addresses, "transport": stack.transport, "metrics": metrics_urls}
            print(json.dumps(document), flush=True)
        else:
            print(f"gansteer up: {stack.transport}", flush=True)
            for name, address in addresses.items():
                print(f"  {name:13} {address}", flush=True)
            for name, url in metrics_urls.items():
                print(f"  {'metrics':13} {name:13} {url}", flush=True)
            if any_port:
                print(
                    f"  connect with: gansteer --target {stack.optimization_address} "
                    f"--generation-target {stack.generation_address} --scoring-target {stack.scoring_address} ...",
                    flush=True,
                )
            print("Ctrl-C stops everything.", flush=True)
        while not stopping.wait(0.5):
            pass
        print("gansteer up: stopping", file=sys.stderr, flush=True)
    finally:
        if web is not None and clients is not None:
            web.shutdown()
            web.server_close()
            clients.close()
        stack.stop()
        _restore(previous)
    return 0


def _restore(previous: dict[signal.Signals, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
