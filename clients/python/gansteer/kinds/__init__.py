"""The job kinds the SDK builds specs for, one module each: its options (a TypedDict of the spec's fields, built
from the groups in `_common`), its spec builder, and its result type.

Adding a kind to the SDK: a module here, one entry in `KINDS`, a plan in `_core.Core` that submits it, and one
method on `Client` and on `AsyncClient` (tests/test_sdk_parity.py fails until both have it with one signature).
"""

from __future__ import annotations

from collections.abc import Mapping

from gansteer.kinds._common import Kind
from gansteer.kinds.embedding_am import (
    EMBEDDING_AM,
    AMTrial,
    EmbeddingAMOptions,
    EmbeddingAMResult,
    embedding_am_spec,
)
from gansteer.kinds.evolution import EVOLUTION, EvolutionOptions, EvolutionResult, evolution_spec
from gansteer.kinds.human_nes import HUMAN_NES, HumanNESOptions, HumanNESResult, human_nes_spec
from gansteer.kinds.inversion import INVERSION, InversionOptions, InversionResult, inversion_spec
from gansteer.kinds.latent_search import (
    LATENT_SEARCH,
    LatentSearchOptions,
    LatentSearchResult,
    latent_search_spec,
)
from gansteer.kinds.pir import (
    PIR_ESTIMATOR,
    PIR_TUNING,
    PIREstimatorOptions,
    PIREstimatorResult,
    PIRTuningOptions,
    PIRTuningResult,
    pir_estimator_spec,
    pir_tuning_spec,
)
from gansteer.types import JobResult

KINDS: Mapping[str, Kind] = {
    kind.name: kind
    for kind in (INVERSION, EVOLUTION, LATENT_SEARCH, EMBEDDING_AM, HUMAN_NES, PIR_ESTIMATOR, PIR_TUNING)
}


def result_type(kind: str) -> type[JobResult]:
    """The result type of a kind's jobs; a plain JobResult for a kind this SDK has no helper for."""
    return KINDS[kind].result if kind in KINDS else JobResult


__all__ = [
    "KINDS",
    "AMTrial",
    "EmbeddingAMOptions",
    "EmbeddingAMResult",
    "EvolutionOptions",
    "EvolutionResult",
    "HumanNESOptions",
    "HumanNESResult",
    "InversionOptions",
    "InversionResult",
    "Kind",
    "LatentSearchOptions",
    "LatentSearchResult",
    "PIREstimatorOptions",
    "PIREstimatorResult",
    "PIRTuningOptions",
    "PIRTuningResult",
    "embedding_am_spec",
    "evolution_spec",
    "human_nes_spec",
    "inversion_spec",
    "latent_search_spec",
    "pir_estimator_spec",
    "pir_tuning_spec",
    "result_type",
]
