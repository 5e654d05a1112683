"""docs/grpc.md and docs/sdk.md stay true: every grpcurl request body parses as the request message of the method
it calls (field names, enum names, base64 bytes), and every Python example is valid Python."""

from __future__ import annotations

import ast
import base64
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, message_factory

from gansteer import tensors
from gansteer.v1 import generation_pb2, optimization_pb2, scoring_pb2

DOCS = Path(__file__).resolve().parents[1] / "docs"
PNG = base64.b64encode(tensors.png_encode(np.zeros((4, 4, 3), np.uint8))).decode()
SERVICES = {
    file.services_by_name[name].full_name: file.services_by_name[name]
    for file in (generation_pb2.DESCRIPTOR, scoring_pb2.DESCRIPTOR, optimization_pb2.DESCRIPTOR)
    for name in file.services_by_name
}
# A grpcurl command up to the gansteer method it calls (its options may span lines; never into the next command).
COMMAND = re.compile(r"grpcurl (?P<options>(?:(?!grpcurl).)*?)(?P<method>gansteer\.v1\.\w+/\w+)", re.DOTALL)


def grpcurl_calls() -> list[tuple[str, str]]:
    """(method, JSON body) of every grpcurl call on a gansteer service in docs/grpc.md."""
    text = (DOCS / "grpc.md").read_text()
    text = text.replace('"\'"$JOB"\'"', '"0123456789abcdef01234567"')
    text = re.sub(r"\$\(base64 -w0 [^)]+\)", PNG, text)
    calls = []
    for match in COMMAND.finditer(text):
        options = match["options"]
        if "-d @" in options:
            body = text[match.end("method") :].split("<<EOF\n", 1)[1].split("\nEOF", 1)[0]
        elif "-d '" in options:
            body = options.split("-d '", 1)[1].rsplit("'", 1)[0]
        else:
            body = "{}"
        calls.append((match["method"], body))
    return calls


CALLS = grpcurl_calls()


def test_the_doc_shows_every_job_method() -> None:
    shown = {method.split("/")[1] for method, _ in CALLS}
    assert {"SubmitJob", "WatchJob", "GetJob", "CancelJob", "GetResult", "ListJobs", "Generate", "Score"} <= shown


@pytest.mark.parametrize(("method", "body"), CALLS, ids=[f"{m.split('/')[1]}-{i}" for i, (m, _) in enumerate(CALLS)])
def test_grpcurl_bodies_parse_as_their_request(method: str, body: str) -> None:
    service, name = method.split("/")
    descriptor = SERVICES[service].methods_by_name[name].input_type
    request = json_format.Parse(body, message_factory.GetMessageClass(descriptor)())
    assert request.ByteSize() > 0 or body.strip() == "{}"


def test_sdk_examples_are_python() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "sdk.md").read_text(), re.DOTALL)
    assert blocks
    for block in blocks:
        if "await " in block or "async " in block:
            block = "async def example():\n" + textwrap.indent(block, "    ")
        ast.parse(block)
