"""The latent-search benchmark's quick path on the shipped zoo: it runs end to end (speedups, the table through the
job kind, BasinCMA against Adam) and writes every figure issue 13 asks for, and the page generator turns a result
into docs text. The figures themselves are the full run's business, not this test's."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = [pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str) -> ModuleType:
    """bench/ is a folder of scripts, not a package: import them with the folder on the path, as a script runs."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_the_quick_benchmark_writes_every_figure_and_a_page(tmp_path: Path) -> None:
    bench, doc = load("latent_search"), load("latent_search_doc")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = bench.run_benchmark(bench.QUICK, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    table = results["table"]
    assert set(table) == {"samples", "adam", "cmaes", "ga"}
    for entry in table.values():
        for key in ("objective", "p10", "judge_accuracy", "classifier_accuracy", "realism", "seconds"):
            assert math.isfinite(entry[key]), key
        assert entry["p10"] <= entry["objective"] + 1.0 and len(entry["items"]) == len(bench.QUICK.classes)
    assert results["p10_batched_speedup"]["speedup"] > 0
    assert {"cmaes", "ga"} == set(results["population_speedup"])
    basin = results["basincma"]
    assert basin["adam"]["generator_calls"] == basin["basincma"]["generator_calls"] == bench.QUICK.basin_budget
    assert 0 <= basin["basincma_wins_fraction"] <= 1
    page = tmp_path / "latent_search.md"
    doc.write_doc(results, page)
    text = page.read_text()
    assert "## The table" in text and "robustness p10" in text and "BasinCMA reaches a lower criterion" in text
