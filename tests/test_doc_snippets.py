"""The Python in the README's quickstart and in docs/sdk.md runs, in order, against a real stack, so the docs cannot
drift from what the SDK and the server do (issue 19). Each block runs as written except for the substitutions below:
budgets, steps and rounds cut to a smoke size, and the stack's addresses in place of the default ports. Names a
block leaves to the reader (`images`, `show`, `my_objective`, a websocket) are given plain stand-ins."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

import gansteer
from gansteer_server.config import BUILTIN_REGISTRY
from gansteer_server.embedded import Stack, start_stack

pytestmark = [pytest.mark.service, pytest.mark.job, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("GANSTEER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# (pattern, replacement): smoke-sized runs of the documented calls; nothing else in a block is changed.
SMOKE = [
    (r"\bbudget=(?!600\b)\d+", "budget=3"),
    (r"\bbudget=600\b", "budget=30"),  # generator calls: two CMA-ES populations
    (r"\bsteps=\d+", "steps=2"),
    (r"\bsimulate_images=\d+", "simulate_images=220"),  # 100 bins per estimator, two estimators
    (r"\bepochs=\d+", "epochs=1"),
    (r"\beval_images=\d+", "eval_images=40"),
    (r"\btrials=5\b", "trials=2"),
    (r"\brounds=\d+", "rounds=1"),
    (r"\brestarts=\d+", "restarts=1"),
]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.DOTALL)


def smoke_sized(block: str, stack: Stack) -> str:
    for pattern, replacement in SMOKE:
        block = re.sub(pattern, replacement, block)
    targets = (
        f'"{stack.optimization_address}", generation_target="{stack.generation_address}", '
        f'scoring_target="{stack.scoring_address}"'
    )
    block = block.replace("gansteer.Client()", f"gansteer.Client({targets})")
    block = block.replace('gansteer.AsyncClient("localhost:50053")', f"gansteer.AsyncClient({targets})")
    if "await " in block and "AsyncClient(" not in block:  # written for inside an async client's block
        prelude = f"async with gansteer.AsyncClient({targets}) as client:\n    job = await client.job(job_id)\n"
        block = prelude + textwrap.indent(block, "    ")
    return block


class Socket:
    """A websocket stand-in: what a web app would send, kept."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send_json(self, value: Any) -> None:
        self.sent.append(value)


def reader_names(folder: Path) -> dict[str, Any]:
    """What the blocks leave to the reader: images on disk and in memory, a display, an objective, a browser."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    for name in ("photo.jpg", "photo.png", "target.png"):
        photo.save(folder / name)

    async def ask_the_browser(images: list[Image.Image], choose: int) -> list[int]:
        return [0] * choose

    return {
        "np": np,
        "image": photo,
        "images": [photo, photo],
        "targets": [photo, photo],
        "show": lambda *shown: None,
        "my_objective": lambda shown: np.arange(len(shown), dtype=float),
        "websocket": Socket(),
        "ask_the_browser": ask_the_browser,
    }


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    prefix = f"gansteer-test-docs-{uuid.uuid4().hex[:8]}:"
    registry = tmp_path / "registry"  # embedding AM and human NES register versions: never into the repo's zoo
    paths = (registry, BUILTIN_REGISTRY)
    running = start_stack(redis_url=REDIS_URL, key_prefix=prefix, torch_threads=1, registry_paths=paths)
    try:
        yield running
    finally:
        running.stop()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def run_block(code: str, namespace: dict[str, Any], where: str) -> None:
    """Runs one block; top-level `await` (the async examples) runs in an event loop."""
    compiled = compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    outcome = eval(compiled, namespace)  # the repository's own docs
    if asyncio.iscoroutine(outcome):
        asyncio.run(outcome)


def test_the_quickstart_and_the_sdk_guide_run_against_a_stack(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs", **reader_names(tmp_path)}
    blocks = [(f"README.md[{i}]", b) for i, b in enumerate(python_blocks(ROOT / "README.md"))]
    blocks += [(f"docs/sdk.md[{i}]", b) for i, b in enumerate(python_blocks(ROOT / "docs" / "sdk.md"))]
    assert len(blocks) >= 15, "the docs lost their examples"
    open_client = gansteer.Client(
        stack.optimization_address, generation_target=stack.generation_address, scoring_target=stack.scoring_address
    )
    for where, block in blocks:
        code = smoke_sized(block, stack)
        namespace["client"] = open_client  # the guide's `client`, open (a quickstart's `with` closed its own)
        if "job" in namespace:
            namespace["job_id"] = namespace["job"].id  # `client.job(job_id)`: the id of the job at hand
        if "embedded()" in code:  # a second stack in this process; tests/test_sdk_e2e.py runs embedded mode
            continue
        if "budgett=" in code:  # the misspelled-option example: it must raise what the guide says
            with pytest.raises(TypeError, match="did you mean 'budget'"):
                run_block(code, namespace, where)
            continue
        try:
            run_block(code, namespace, where)
        except Exception as error:
            raise AssertionError(f"{where} failed: {type(error).__name__}: {error}\n{code}") from error
    open_client.close()
    assert (tmp_path / "nearest-scene.png").is_file()  # the quickstart's output
    assert (tmp_path / "out" / "photo" / "result.json").is_file()  # the regeneration example's
