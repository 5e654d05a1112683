"""The server side's settings: one frozen `Settings` read from `GANSTEER_*` environment variables.

Each field of `Settings` declares its variable's default (as the text a user would write), its parser and its
meaning; `Settings.from_env` and the documentation (`settings_table`, `settings_markdown`) both read those
declarations, so they cannot drift apart. The variable is the field's name in upper case with the prefix, unless
the field names another. The defaults work on one machine: Redis on loopback, services on loopback ports, no keys.

Authentication: with API keys configured, every call must carry one. Without keys auth is off, which is safe only on
loopback, so a service bound to any other address with no keys refuses to start unless `GANSTEER_AUTH=off` says so
explicitly. `GANSTEER_AUTH=off` turns auth off even when keys are set; `GANSTEER_AUTH=on` without keys is an error
(every call would be refused).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

ENV_PREFIX = "GANSTEER_"
BUILTIN_REGISTRY = Path(__file__).resolve().parent / "zoo" / "registry"


class ConfigError(ValueError):
    """A `GANSTEER_*` variable holds a value the server cannot use; the message names the variable."""


# Parsers: each takes the variable's text and returns the field's value, or raises ValueError saying what is wrong.


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError("expected an integer") from None
        if value < low or (high is not None and value > high):
            raise ValueError(f"expected an integer from {low}" + (f" to {high}" if high is not None else " up"))
        return value

    return parse


_port = _int_in(0, 65535)
#: A metrics port the system picks (bound as port 0, then printed): what `gansteer up --any-port` asks for, where 0
#: would mean off. Not a value of the environment variables.
ANY_PORT = -1


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if not 0 <= value < float("inf"):
        raise ValueError("expected a finite number, 0 or more")
    return value


def _backend(text: str) -> str:
    if text.lower() not in ("local", "remote"):
        raise ValueError("expected local or remote")
    return text.lower()


def _log_level(text: str) -> str:
    levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if text.upper() not in levels:
        raise ValueError(f"expected one of {', '.join(levels)}")
    return text.upper()


def _redis_url(text: str) -> str:
    if urlsplit(text).scheme not in ("redis", "rediss", "unix", "memory"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL (or memory:// for the in-process transport)")
    return text


def _registry_paths(text: str) -> tuple[Path, ...]:
    """Absolute folders (resolved against the working directory now), then the built-in zoo, listed once."""
    parts = [p.strip() for p in text.split(os.pathsep) if p.strip()]
    if not parts:
        raise ValueError("expected at least one folder")
    paths = [Path(p).expanduser().resolve() for p in parts]
    return (*(p for p in paths if p != BUILTIN_REGISTRY), BUILTIN_REGISTRY)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _host(text: str) -> str:
    if any(c.isspace() for c in text) or "/" in text:
        raise ValueError("expected a host name or IP address")
    return text


def _address(text: str) -> str:
    if text and (":" not in text or any(c.isspace() for c in text)):
        raise ValueError("expected host:port")
    return text


def _setting(default: str, parse: Callable[[str], Any], meaning: str, *, variable: str = "") -> Any:
    """A Settings field read from a variable; its default is `parse(default)`, so the docs show what users type."""
    return field(
        default_factory=lambda: parse(default),
        metadata={"default": default, "parse": parse, "meaning": meaning, "variable": variable},
    )


_AUTH_MEANING = (
    "`off` disables API-key checks even with keys set; `on` requires keys; empty: on exactly when keys are set "
    "(and refused on a non-loopback host with no keys)."
)


@dataclass(frozen=True)
class Settings:
    """Everything a service or worker process is configured with. Build it with `Settings.from_env()`."""

    redis_url: str = _setting(
        "redis://127.0.0.1:6379/0", _redis_url, "Redis for the Celery broker, job records, event streams, checkpoints."
    )
    registry_paths: tuple[Path, ...] = _setting(
        "var/registry",
        _registry_paths,
        f"Model registry folders separated by `{os.pathsep}`, relative to the working directory; the first receives "
        "new versions; the built-in zoo (`gansteer_server/zoo/registry`) is always searched last.",
        variable="GANSTEER_REGISTRY",
    )
    host: str = _setting(
        "127.0.0.1", _host, "Address the services bind to (`0.0.0.0`: every interface; then set keys or auth off)."
    )
    generation_port: int = _setting("50051", _port, "gRPC port of the generation service (0: any free port).")
    scoring_port: int = _setting("50052", _port, "gRPC port of the scoring service (0: any free port).")
    optimization_port: int = _setting("50053", _port, "gRPC port of the optimization service (0: any free port).")
    generation_address: str = _setting(
        "", _address, "host:port where workers reach the generation service; empty: the host and port above."
    )
    scoring_address: str = _setting(
        "", _address, "host:port where workers reach the scoring service; empty: the host and port above."
    )
    generation_metrics_port: int = _setting("9461", _port, "Prometheus port of the generation service (0: off).")
    scoring_metrics_port: int = _setting("9462", _port, "Prometheus port of the scoring service (0: off).")
    optimization_metrics_port: int = _setting("9463", _port, "Prometheus port of the optimization service (0: off).")
    worker_metrics_port: int = _setting("9464", _port, "Prometheus port of a worker (0: off).")
    api_keys: tuple[str, ...] = _setting(
        "", _comma_list, "Comma-separated API keys accepted as `authorization: Bearer <key>`; empty: none."
    )
    # Derived in from_env from GANSTEER_AUTH and the keys; the default is the result for the default variables.
    auth_disabled: bool = field(default=True, metadata={"variable": "GANSTEER_AUTH", "meaning": _AUTH_MEANING})
    max_batch: int = _setting("64", _int_in(1), "Dynamic batching: most images in one forward pass.")
    max_delay_ms: float = _setting(
        "5", _milliseconds, "Dynamic batching: longest wait in milliseconds for a batch to fill (0: none)."
    )
    max_queue: int = _setting(
        "1024", _int_in(1), "Images queued per model before requests are refused with RESOURCE_EXHAUSTED."
    )
    max_images_per_request: int = _setting("256", _int_in(1), "Most images one request may ask for or send.")
    max_image_pixels: int = _setting(
        "16777216", _int_in(1), "Most pixels (width x height) in one image a client sends; larger ones are refused."
    )
    max_message_mb: int = _setting("64", _int_in(1, 2047), "Largest gRPC message, sent or received, in MiB.")
    torch_threads: int = _setting("0", _int_in(0), "torch intra-op threads per process (0: torch's default).")
    backend: str = _setting(
        "local", _backend, "Where job models run: `local` (in the worker) or `remote` (through the services)."
    )
    onnx_models: tuple[str, ...] = _setting(
        "", _comma_list, "Comma-separated models (`name` or `name@version`) served forward-only by ONNX Runtime."
    )
    job_result_ttl_s: int = _setting("86400", _int_in(1), "Seconds a finished job's record and result are kept.")
    job_max_budget: int = _setting("100000", _int_in(1), "Largest budget (steps or generator calls) a job may ask for.")
    job_max_time_limit_s: int = _setting("86400", _int_in(1), "Longest running time a job may ask for, in seconds.")
    job_segment_steps: int = _setting(
        "200", _int_in(1), "Steps one worker task runs before it checkpoints and re-enqueues the job."
    )
    job_segment_seconds: int = _setting(
        "30", _int_in(1), "Seconds one worker task runs at most; keep under a third of the visibility timeout."
    )
    job_max_deliveries: int = _setting(
        "3", _int_in(1), "Deliveries of one segment before the job fails (a task that kills its worker each time)."
    )
    job_sweep_interval_s: int = _setting(
        "60", _int_in(0), "Seconds between sweeps for jobs no task carries (the optimization service); 0: never."
    )
    job_round_expiry_s: int = _setting(
        "86400", _int_in(1), "Seconds a round waits for feedback before its job ends with its best result so far."
    )
    broker_visibility_timeout_s: int = _setting(
        "600", _int_in(1), "Seconds before the broker re-delivers an unacknowledged task (a lost worker's)."
    )
    log_level: str = _setting("INFO", _log_level, "Log level of the server processes.")

    @property
    def writable_registry(self) -> Path:
        """The registry folder new model versions are written to."""
        return self.registry_paths[0]

    @property
    def auth_enabled(self) -> bool:
        return not self.auth_disabled

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    def service_address(self, service: str) -> str:
        """`host:port` at which to reach `service` (`generation`, `scoring` or `optimization`)."""
        ports = {
            "generation": self.generation_port,
            "scoring": self.scoring_port,
            "optimization": self.optimization_port,
        }
        if service not in ports:
            raise ValueError(f"unknown service {service!r}; expected one of {', '.join(ports)}")
        explicit = {"generation": self.generation_address, "scoring": self.scoring_address}.get(service, "")
        if explicit:
            return explicit
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"[{host}]:{ports[service]}" if ":" in host else f"{host}:{ports[service]}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `environ` (default: `os.environ`); unset or empty variables take their default.

        Raises ConfigError naming the variable for any value it cannot use. Unknown `GANSTEER_*` variables are
        logged as warnings: a typo should not pass silently, but other tools may share the prefix.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if "parse" not in spec.metadata:
                continue
            raw = env.get(variable_name(spec), "").strip()
            try:
                values[spec.name] = spec.metadata["parse"](raw or spec.metadata["default"])
            except ValueError as error:
                shown = raw or f"(default {spec.metadata['default']!r})"
                raise ConfigError(f"{variable_name(spec)}={shown}: {error}") from error
        values["auth_disabled"] = _auth_disabled(
            env.get("GANSTEER_AUTH", "").strip(), values["api_keys"], values["host"]
        )
        known = {variable_name(spec) for spec in fields(cls)} | CLIENT_VARIABLES
        for name in sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known):
            logger.warning("ignoring unknown setting %s (see gansteer_server.config.settings_table())", name)
        return cls(**values)


# Read by the SDK and CLI (`clients/python/gansteer`), not by the server processes; and the test suite's own.
CLIENT_VARIABLES = frozenset(
    {
        "GANSTEER_TARGET",
        "GANSTEER_GENERATION_TARGET",
        "GANSTEER_SCORING_TARGET",
        "GANSTEER_API_KEY",
        "GANSTEER_TEST_REDIS_URL",
    }
)


def variable_name(spec: Field[Any]) -> str:
    """The environment variable a Settings field is read from."""
    return str(spec.metadata.get("variable") or ENV_PREFIX + spec.name.upper())


def _auth_disabled(mode: str, api_keys: tuple[str, ...], host: str) -> bool:
    if not mode:
        if not api_keys and not _is_loopback(host):
            raise ConfigError(
                f"GANSTEER_AUTH: the services would listen on {host} with no GANSTEER_API_KEYS; set keys, "
                "or GANSTEER_AUTH=off to run without authentication on purpose"
            )
        return not api_keys
    if mode.lower() in ("off", "false", "0", "no"):
        return True
    if mode.lower() in ("on", "true", "1", "yes"):
        if not api_keys:
            raise ConfigError(f"GANSTEER_AUTH={mode}: needs at least one key in GANSTEER_API_KEYS")
        return False
    raise ConfigError(f"GANSTEER_AUTH={mode}: expected on or off")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SettingDoc(NamedTuple):
    """One row of the settings documentation."""

    variable: str
    default: str
    meaning: str


def settings_table() -> list[SettingDoc]:
    """(variable, default as typed, meaning) for every setting, in the order of the Settings fields."""
    return [
        SettingDoc(variable_name(s), s.metadata.get("default", ""), s.metadata["meaning"]) for s in fields(Settings)
    ]


def settings_markdown() -> str:
    """The settings as a Markdown table, for the README."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [
        f"| `{row.variable}` | {f'`{row.default}`' if row.default else '(empty)'} | {row.meaning} |"
        for row in settings_table()
    ]
    return "\n".join(lines)
