"""`make demo` as a newcomer runs it (with a small budget): the stack starts, both cases run through the SDK, the
grids land in the output folder, the criterion and the time are printed, and nothing is left running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = [pytest.mark.service, pytest.mark.job, pytest.mark.slow]


def test_demo_writes_grids_and_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "GANSTEER_TORCH_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gansteer_server.demo", "--out", str(out), "--budget", "10", "--photos", "astronaut"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("grid.png", "photo_grid.png", "generated_grid.png", "photo_target_0.png", "generated_result_2.png"):
        assert (out / name).is_file(), name
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 2 * 128 and grid.height > 4 * 128  # target and result side by side, 1 + 3 rows
    assert "criterion" in done.stdout and "PSNR" in done.stdout and "everything stopped" in done.stdout
