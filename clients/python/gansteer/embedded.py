"""`gansteer.embedded()`: the whole gansteer stack inside this process, for a laptop with nothing installed.

The three services start on free loopback ports and a Celery worker runs in a thread of this process on Celery's
in-memory transport (or on Redis, when given a URL), through the server package's own start helpers, so the code
paths are those of a real deployment. The SDK never depends on the server package: it is imported only when
`embedded()` is called, and its absence is reported with the command that installs it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from gansteer.client import Client

_INSTALL_HINT = (
    "gansteer.embedded() runs the services in this process and needs the server package, which is not installed; "
    "install it with `pip install gansteer-server` (from a checkout: `pip install -e services`), or connect to "
    "running services with gansteer.Client(target)"
)


@contextlib.contextmanager
def embedded(*, redis_url: str | None = None, timeout: float = 120.0, **settings: Any) -> Iterator[Client]:
    """Starts the stack, yields a Client connected to it, and stops everything on exit (even on an exception).

    `redis_url`: run jobs through this Redis instead of the in-memory transport. Further keyword arguments
    override the server settings (`gansteer_server.config.Settings` fields, e.g. `max_image_pixels=4096`).
    `timeout` is the client's per-call deadline.
    """
    try:
        server = importlib.import_module("gansteer_server.embedded")
    except ImportError as error:
        if error.name is not None and not error.name.startswith("gansteer_server"):
            raise
        raise ImportError(_INSTALL_HINT, name="gansteer_server") from error
    stack = server.start_stack(redis_url=redis_url, transport="auto" if redis_url else "memory", **settings)
    try:
        with Client(
            stack.optimization_address,
            generation_target=stack.generation_address,
            scoring_target=stack.scoring_address,
            api_key=stack.api_key,
            timeout=timeout,
        ) as client:
            yield client
    finally:
        stack.stop()
