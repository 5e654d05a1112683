"""The inversion benchmark's quick path, on tiny random-weight models: it runs end to end (table, batched
populations, real jobs on a private redis-server through both backends) and writes every key issue 5 asks for,
with finite values and positive ratios. The figures themselves are the full run's business, not this test's."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import save
from torch import nn

from gansteer_server.config import Settings
from gansteer_server.models import ModelRegistry
from gansteer_server.models.architectures.scenes import ScenesClassifier, ScenesDiscriminator, ScenesGenerator

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.job]

BENCH = Path(__file__).resolve().parents[1] / "bench" / "inversion.py"
IMAGES = {"resolution": 32, "channels": 3, "value_range": [-1.0, 1.0]}
GEN_KWARGS = {"z_size": 16, "num_classes": 4, "embedding_size": 8, "widths": (32, 16, 8, 8), "spectral_norm": False}
DISC_KWARGS = {"num_classes": 4, "widths": (8, 8, 8, 8), "spectral_norm": False}
CLF_KWARGS = {"num_classes": 4, "widths": (8, 16, 32)}


def load_bench() -> ModuleType:
    """bench/ is a folder of scripts, not a package: load the file as a module."""
    spec = importlib.util.spec_from_file_location("bench_inversion", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def register(registry: ModelRegistry, name: str, module: nn.Module, card: dict[str, object]) -> None:
    weights = save({key: value.contiguous() for key, value in module.state_dict().items()})
    registry.register(
        name,
        {"format": "safetensors", "weights": "weights.safetensors", **card, **IMAGES},
        {"weights.safetensors": weights},
    )


def tiny_settings(root: Path) -> Settings:
    """A fresh registry of tiny random-weight models of the built-in architectures, and settings that use it."""
    torch.manual_seed(0)
    registry = ModelRegistry([root])
    register(
        registry,
        "bench-gen",
        ScenesGenerator(**GEN_KWARGS),
        {
            "kind": "generator",
            "architecture": "scenes_generator",
            "architecture_kwargs": GEN_KWARGS,
            "latent_size": 16,
            "num_classes": 4,
            "embedding_size": 8,
        },
    )
    register(
        registry,
        "bench-disc",
        ScenesDiscriminator(**DISC_KWARGS),
        {
            "kind": "discriminator",
            "architecture": "scenes_discriminator",
            "architecture_kwargs": DISC_KWARGS,
            "num_classes": 4,
        },
    )
    register(
        registry,
        "bench-clf",
        ScenesClassifier(**CLF_KWARGS),
        {
            "kind": "classifier",
            "architecture": "scenes_classifier",
            "architecture_kwargs": CLF_KWARGS,
            "num_classes": 4,
        },
    )
    return Settings.from_env({"GANSTEER_REGISTRY": str(root), "GANSTEER_AUTH": "off"})


def test_quick_run_writes_every_required_key(tmp_path: Path) -> None:
    bench = load_bench()
    results = bench.run_benchmark(
        bench.QUICK,
        tiny_settings(tmp_path / "registry"),
        generator="bench-gen",
        discriminator="bench-disc",
        feature_extractor="bench-clf",
        log=lambda line: None,
    )
    path = tmp_path / "inversion.json"
    bench.write_results(results, path)
    written = json.loads(path.read_text())

    assert {"overhead_local", "overhead_remote", "population_speedup", "table", "machine"} <= set(written)
    for key in ("overhead_local", "overhead_remote"):
        assert math.isfinite(written[key]) and written[key] > 0, key
    free = {"random_search", "TwoPointsDE", "DE", "DiscreteDE", "DiscreteOnePlusOne", "CMA"}
    assert set(written["population_speedup"]) == free
    assert all(math.isfinite(r) and r > 0 for r in written["population_speedup"].values())
    assert set(written["table"]) == {"reconstruction"}
    for optimizer, by_budget in written["table"]["reconstruction"].items():
        assert set(by_budget) == {str(b) for b in bench.QUICK.budgets}, optimizer
        for budget, entry in by_budget.items():
            assert math.isfinite(entry["criterion"]), optimizer
            assert math.isfinite(entry["psnr"]), optimizer
            assert 0 < entry["generator_calls"] <= int(budget), optimizer
    # Issue 20's figures: where each result lies against the generator's own samples, L-BFGS stalls, half budget.
    top = written["table"]["reconstruction"]["adam"][str(max(bench.QUICK.budgets))]
    assert 0 <= top["d_percentile"] <= 100 and 0 < top["judge_confidence"] <= 1
    assert top["z_norm"] > 0 and top["hull_distance"] >= 0 and top["class_norm"] > 0
    lbfgs = written["table"]["reconstruction"]["lbfgs"][str(max(bench.QUICK.budgets))]
    assert 0 <= lbfgs["stalled_fraction"] <= 1
    half = written["half_budget"]["reconstruction"]
    assert math.isfinite(half["ratio"]) and half["ratio"] > 0
    assert written["machine"]["torch_threads"] == torch.get_num_threads()
    assert {"cpu", "cores", "torch"} <= set(written["machine"])
    assert written["settings"]["budget_unit"] == "generator_calls"
    assert "Adam" in bench.format_report(written)
