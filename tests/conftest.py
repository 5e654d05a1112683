"""Shared fixtures. The suite shares two cores with other work, so torch runs single-threaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gansteer_server.models import ModelRegistry

torch.set_num_threads(1)


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    """An empty registry whose only (writable) root lies in the test's temporary folder."""
    return ModelRegistry([tmp_path / "registry"])
