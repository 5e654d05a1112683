"""Log lines stay bounded: text a client sent, echoed into a message or a field, or a deep traceback, never makes a
line longer than `MAX_LINE`, and what is cut says how long it was."""

from __future__ import annotations

import json
import logging
import sys

from gansteer_server.logs import MAX_LINE, JsonFormatter


def record(message: str, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("gansteer_server.test", logging.INFO, __file__, 1, message, (), None)
    entry.__dict__.update(extra)
    return entry


def test_short_records_are_written_whole() -> None:
    line = JsonFormatter().format(record("refused GetJob", method="/x/GetJob", code="INVALID_ARGUMENT", ms=1.5))
    entry = json.loads(line)
    assert entry["message"] == "refused GetJob" and entry["code"] == "INVALID_ARGUMENT" and entry["ms"] == 1.5


def test_a_huge_message_or_field_is_cut_with_its_length() -> None:
    line = JsonFormatter().format(record("job_id: " + "a" * 9000, field="b" * 50_000, details={"k": "c" * 9000}))
    assert len(line) <= MAX_LINE
    entry = json.loads(line)
    assert entry["message"].endswith("(9008 characters)")
    assert entry["field"].endswith("(50000 characters)")


def test_many_long_fields_and_a_deep_traceback_stay_within_the_line() -> None:
    def recurse(depth: int) -> None:
        if depth == 0:
            raise RuntimeError("x" * 5000)
        recurse(depth - 1)

    try:
        recurse(200)
    except RuntimeError:
        failing = record("internal error", **{f"f{i}": "y" * 900 for i in range(10)})
        failing.exc_info = sys.exc_info()
    line = JsonFormatter().format(failing)
    assert len(line) <= MAX_LINE
    entry = json.loads(line)
    assert entry["level"] == "INFO" and entry["message"] == "internal error" and "traceback" in entry["dropped"]
