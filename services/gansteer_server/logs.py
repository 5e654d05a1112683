"""The server processes' log format: one JSON object per line on stderr, with every `extra=` field of a record.

Shared by the services (`servers/main.py`) and the worker (`jobs/worker.py`); docs/operations.md lists the fields
of the call and job-transition lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else was passed with `extra=` and goes into the JSON object.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
#: The longest line written, in characters: a request's text echoed into a message (a 9,000-character job id, a
#: multi-megabyte field) must not turn each refused call into megabytes of log.
MAX_LINE = 4096
#: The longest single value (message or field) kept whole, and the end of a traceback kept (its last frames say most).
MAX_VALUE, MAX_TRACEBACK = 1000, 2500


class JsonFormatter(logging.Formatter):
    """One JSON object per line, at most `MAX_LINE` characters: time, level, logger, message, the `extra` fields
    and any traceback. Long values are cut with their length stated."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": _cut(record.getMessage(), MAX_VALUE),
        }
        entry.update({k: _bounded(v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            entry["traceback"] = trace if len(trace) <= MAX_TRACEBACK else "..." + trace[-MAX_TRACEBACK:]
        line = json.dumps(entry, default=str)
        if len(line) <= MAX_LINE:
            return line
        # Still too long (many long fields): keep the record's identity and say what was dropped.
        kept = {key: entry[key] for key in ("time", "level", "logger") if key in entry}
        kept["message"] = _cut(entry["message"], 500)
        kept["dropped"] = sorted(set(entry) - set(kept))
        return json.dumps(kept, default=str)[:MAX_LINE]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _bounded(value: Any) -> Any:
    """A field's value as it is when short (numbers, short strings, small lists and dicts), else cut to MAX_VALUE
    characters of its text."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return _cut(value, MAX_VALUE)
    text = json.dumps(value, default=str)
    return value if len(text) <= MAX_VALUE else _cut(text, MAX_VALUE)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
