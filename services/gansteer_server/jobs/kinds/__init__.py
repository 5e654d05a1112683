"""Job kinds, one module each in this package, found through one registry.

Adding a kind is one module here that defines a `JobKind` subclass and calls `register_kind` on an instance, plus
its spec message in `optimization.proto` (see docs/adding_a_job_kind.md). Every module of this package is imported
the first time the registry is read, so the optimization service, the workers and `ListJobKinds` all see the same
kinds; tests register their own kinds with `register_kind` before a worker starts.
"""

from __future__ import annotations

import importlib
import pkgutil

from gansteer_server.jobs.kinds.base import (
    CPU_QUEUE,
    GPU_QUEUE,
    QUEUES,
    JobKind,
    JobRun,
    ModelCatalog,
    PublishingRun,
    RoundRun,
    SearchJobRun,
    StepProgress,
    SubmitContext,
)

_KINDS: dict[str, JobKind] = {}
_BUILTINS_IMPORTED = False


def register_kind(kind: JobKind) -> JobKind:
    if kind.name in _KINDS:
        raise ValueError(f"job kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> JobKind:
    _import_builtin_kinds()
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown job kind {name!r} (known: {', '.join(sorted(_KINDS))})") from None


def kind_names() -> list[str]:
    _import_builtin_kinds()
    return sorted(_KINDS)


def _import_builtin_kinds() -> None:
    global _BUILTINS_IMPORTED
    if _BUILTINS_IMPORTED:
        return
    _BUILTINS_IMPORTED = True
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


__all__ = [
    "CPU_QUEUE",
    "GPU_QUEUE",
    "QUEUES",
    "JobKind",
    "JobRun",
    "ModelCatalog",
    "PublishingRun",
    "RoundRun",
    "SearchJobRun",
    "StepProgress",
    "SubmitContext",
    "get_kind",
    "kind_names",
    "register_kind",
]
