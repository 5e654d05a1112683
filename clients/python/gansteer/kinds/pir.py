"""PIR estimators and PIR tuning (seed 000): learn a positive-interaction-rate estimator from an impressions table,
then tune a generator toward it with guards. Options, spec builders, result types and the impressions records;
`Client.pir_estimator`, `Client.pir_tuning`, `Client.report_impressions` and `Client.impressions` use them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict, Unpack

import numpy as np

from gansteer._convert import model_ref
from gansteer._specs import _invalid
from gansteer.kinds._common import JobOptions, Kind, _struct, job_spec, option_names
from gansteer.tensors import from_tensor_proto, to_tensor_proto
from gansteer.types import JobResult
from gansteer.v1 import optimization_pb2, scoring_pb2

#: A scorer output in [0, 1] as the true rate: {"output": name, "params": {...}, "model": ref}.
Objective = Mapping[str, Any]


def _objective(objective: Objective, field: str) -> scoring_pb2.OutputRequest:
    if not isinstance(objective, Mapping) or not isinstance(objective.get("output"), str):
        raise _invalid(field, "give a mapping with an `output` name (and optional params, model)")
    unknown = set(objective) - {"output", "params", "model"}
    if unknown:
        raise _invalid(field, f"unknown keys {sorted(unknown)}; an objective takes output, params, model")
    request = scoring_pb2.OutputRequest(output=objective["output"], params=_struct(objective.get("params", {})))
    if objective.get("model"):
        request.model.CopyFrom(model_ref(objective["model"]))
    return request


class PIREstimatorOptions(JobOptions, total=False):
    """The settings of a PIR estimator job (optimization.proto, PIREstimatorSpec) besides its table."""

    simulate_generator: str  # collect simulated interactions on this generator's images first
    simulate_objective: Objective  # ... with this true rate (a scorer output in [0, 1])
    simulate_images: int  # 1000
    simulate_impressions: int  # 1000
    simulate_seed: int
    backbone: str  # a classifier with features() (scenes-clf-alt)
    bins: int  # 100
    learning_rate: float  # 5e-4
    epochs: int  # 30
    held_out: float  # 0.1
    temperature: float  # 0.01, at use
    single: bool  # one estimator on the whole table, no check estimator
    init_estimator: str  # continue from this estimator and its check (round 2)
    register_as: str  # pir-<dataset>
    seed: int


class PIRTuningOptions(JobOptions, total=False):
    """The settings of a PIR tuning job (optimization.proto, PIRTuningSpec) besides generator and estimator."""

    discriminator: str
    check_estimator: str  # default: the estimator card's
    real_data: str  # `scenes` or an absolute folder on the workers
    pir_weight: float  # 10
    learning_rate: float  # 5e-5
    steps: int  # 100
    batch_size: int  # 16
    anchor_weight: float  # 20
    check_every: int  # 25
    patience: int  # 2
    no_guards: bool
    temperature: float  # 0.01
    register_as: str
    seed: int
    objective: Objective  # judge before against after by this true rate
    eval_images: int  # 1000


@dataclass(frozen=True)
class PIREstimatorResult(JobResult):
    """The estimators' held-out losses and the table's statistics in `metrics`; `models` are the registered
    estimator and its check estimator."""


@dataclass(frozen=True)
class PIRTuningResult(JobResult):
    """Samples after tuning (`images`), both estimators before/after and, with an objective, `p_value`, `cohens_d`
    and `ci_999_low/high` of the true rate in `metrics`; `models` is the tuned generator's new version."""

    @property
    def cohens_d(self) -> float:
        return float(self.metrics.get("cohens_d", float("nan")))

    @property
    def p_value(self) -> float:
        return float(self.metrics.get("p_value", float("nan")))


PIR_ESTIMATOR = Kind(
    "pir_estimator", method="pir_estimator", options=option_names(PIREstimatorOptions), result=PIREstimatorResult
)
PIR_TUNING = Kind("pir_tuning", method="pir_tuning", options=option_names(PIRTuningOptions), result=PIRTuningResult)

_SCALARS = ("bins", "learning_rate", "epochs", "held_out", "temperature", "single", "register_as", "seed")


def pir_estimator_spec(*, dataset: str, **options: Unpack[PIREstimatorOptions]) -> optimization_pb2.JobSpec:
    PIR_ESTIMATOR.check(options)
    spec = optimization_pb2.PIREstimatorSpec(dataset=dataset, **{k: options[k] for k in _SCALARS if k in options})  # type: ignore[literal-required]
    if "simulate_generator" in options or "simulate_objective" in options:
        if "simulate_generator" not in options or "simulate_objective" not in options:
            raise _invalid("simulate_generator", "simulating needs both simulate_generator and simulate_objective")
        spec.simulate.generator.CopyFrom(model_ref(options["simulate_generator"]))
        spec.simulate.objective.CopyFrom(_objective(options["simulate_objective"], "simulate_objective"))
        spec.simulate.images = options.get("simulate_images", 0)
        spec.simulate.impressions = options.get("simulate_impressions", 0)
        spec.simulate.seed = options.get("simulate_seed", 0)
    for name in ("backbone", "init_estimator"):
        if options.get(name):
            getattr(spec, name).CopyFrom(model_ref(options[name]))
    return job_spec("pir_estimator", spec, options)


def pir_tuning_spec(*, model: str, estimator: str, **options: Unpack[PIRTuningOptions]) -> optimization_pb2.JobSpec:
    PIR_TUNING.check(options)
    scalars = (
        "real_data", "pir_weight", "learning_rate", "steps", "batch_size", "anchor_weight", "check_every",
        "patience", "no_guards", "temperature", "register_as", "seed", "eval_images",
    )  # fmt: skip
    spec = optimization_pb2.PIRTuningSpec(
        generator=model_ref(model),
        pir_estimator=model_ref(estimator),
        **{k: options[k] for k in scalars if k in options},  # type: ignore[literal-required]
    )
    for name in ("discriminator", "check_estimator"):
        if options.get(name):
            getattr(spec, name).CopyFrom(model_ref(options[name]))
    if "objective" in options:
        spec.objective.CopyFrom(_objective(options["objective"], "objective"))
    return job_spec("pir_tuning", spec, options)


class ImpressionRow(TypedDict, total=False):
    """One shown image's counts as a table row (what `Client.impressions` returns and `report_impressions` takes):
    `generator` (name@version), `seed` or `latent`, `class_id`, `image_id`, `impressions`, `interactions`,
    `cohort`, `time`; the service adds `reporter`, `received_at` and `source`."""

    dataset: str
    generator: str
    seed: int
    latent: Any
    class_id: int
    image_id: str
    impressions: int
    interactions: int
    cohort: str
    time: datetime
    reporter: str
    received_at: datetime
    source: str


def impression_record(dataset: str, row: Mapping[str, Any], index: int) -> optimization_pb2.ImpressionRecord:
    """A row as the wire record; unknown keys are refused naming `records[i]`."""
    known = set(ImpressionRow.__annotations__) - {"reporter", "received_at", "source", "dataset"}
    unknown = set(row) - known
    if unknown:
        raise _invalid(f"records[{index}]", f"unknown keys {sorted(unknown)}; a record takes {sorted(known)}")
    record = optimization_pb2.ImpressionRecord(
        dataset=dataset,
        generator=model_ref(str(row.get("generator", ""))),
        seed=int(row.get("seed", 0)),
        image_id=str(row.get("image_id", "")),
        impressions=int(row.get("impressions", 0)),
        interactions=int(row.get("interactions", 0)),
        cohort=str(row.get("cohort", "")),
    )
    if row.get("latent") is not None:
        record.latent.CopyFrom(to_tensor_proto(np.asarray(row["latent"], dtype=np.float32)))
    if row.get("class_id") is not None:
        record.class_id = int(row["class_id"])
    if row.get("time") is not None:
        record.time.FromDatetime(row["time"])
    return record


def impression_row(record: optimization_pb2.ImpressionRecord) -> ImpressionRow:
    ref = record.generator
    generator = f"{ref.name}@{ref.version}" if ref.version else ref.name
    row: ImpressionRow = {
        "dataset": record.dataset,
        "generator": generator,
        "seed": record.seed,
        "image_id": record.image_id,
        "impressions": record.impressions,
        "interactions": record.interactions,
        "cohort": record.cohort,
        "time": record.time.ToDatetime(),
        "reporter": record.reporter,
        "received_at": record.received_at.ToDatetime(),
        "source": record.source,
    }
    if record.HasField("latent"):
        row["latent"] = from_tensor_proto(record.latent).tolist()
    if record.HasField("class_id"):
        row["class_id"] = record.class_id
    return row
