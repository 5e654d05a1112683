"""The ScoringService servicer: outputs of the scorer registry (`gansteer_server.algorithms.scorers`) over gRPC.

A request is validated into a `ScorePlan` (which outputs, with typed parameters, computed by which registered
models on which backend, for images of which shape). The plan is the batch merge key: concurrent requests with the
same plan share one run, queued on the batcher of the models they use. Binomial noise is applied per request after
the batch, so its values do not depend on what the request was merged with.

Which model computes an output: `OutputRequest.model`, else `ScoreRequest.model` (ScoreGrad: `terms[t].output.model`,
else `ScoreGradRequest.model`); the output's registry entry says which kind of model it needs (a classifier also
serves as a feature extractor). Model-free outputs (the colour objectives) need none.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from google.protobuf import json_format
from torch import Tensor

from gansteer.tensors import to_tensor_proto
from gansteer_server.algorithms import scorers
from gansteer_server.models import ModelCard, ModelNotFound
from gansteer_server.models.store import ImageInput, ModelStore
from gansteer_server.proto import common_pb2, scoring_pb2, scoring_pb2_grpc
from gansteer_server.servers.batching import BatcherPool
from gansteer_server.wire import convert, validation
from gansteer_server.wire.errors import invalid_argument, not_found
from gansteer_server.wire.validation import Limits

# The model kinds that can fill each ScoringModels field.
SLOT_KINDS: dict[str, tuple[str, ...]] = {
    "classifier": ("classifier",),
    "discriminator": ("discriminator",),
    "feature_extractor": ("feature_extractor", "classifier"),
    "pir_estimator": ("pir_estimator",),
}
SLOT_PROTO_KIND = {
    None: common_pb2.MODEL_KIND_UNSPECIFIED,
    "classifier": common_pb2.MODEL_KIND_CLASSIFIER,
    "discriminator": common_pb2.MODEL_KIND_DISCRIMINATOR,
    "feature_extractor": common_pb2.MODEL_KIND_FEATURE_EXTRACTOR,
    "pir_estimator": common_pb2.MODEL_KIND_PIR_ESTIMATOR,
}
# Fields whose models are called on images alone, so an ONNX export can stand in for forward-only requests.
_ONNX_SLOTS = ("classifier", "pir_estimator")
_MODEL_FREE = "model-free"


@dataclass(frozen=True)
class OutputPlan:
    """One output to compute: hashable, so that equal requests merge."""

    name: str
    params: tuple[tuple[str, Any], ...]
    slot: str | None
    ref: str | None
    onnx: bool


@dataclass(frozen=True)
class ScorePlan:
    """A whole request's computation (the batch merge key); `weights` set for a ScoreGrad objective."""

    outputs: tuple[OutputPlan, ...]
    image_shape: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    @property
    def models(self) -> str:
        """The batcher's name: the models the plan runs (requests on the same models share a queue)."""
        refs = sorted({o.ref for o in self.outputs if o.ref is not None})
        return "+".join(refs) or _MODEL_FREE


@dataclass(frozen=True)
class _Requested:
    """An OutputRequest, validated: its plan plus what stays per request (response key, noise)."""

    plan: OutputPlan
    key: str
    card: ModelCard | None
    noise: scorers.BinomialNoise | None


class ScoringServicer(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, store: ModelStore, batchers: BatcherPool, limits: Limits) -> None:
        self.store = store
        self.batchers = batchers
        self.limits = limits
        self._models: dict[tuple[str, str, bool], scorers.ScoringModels] = {}
        self._lock = threading.Lock()

    def ListScorers(
        self, request: scoring_pb2.ListScorersRequest, context: grpc.ServicerContext
    ) -> scoring_pb2.ListScorersResponse:
        cards = self.store.registry.list()
        response = scoring_pb2.ListScorersResponse()
        for described in scorers.describe_outputs():
            slot = described["model"]
            kinds = SLOT_KINDS.get(slot, ())
            wanted = request.model_kind
            if wanted and wanted not in {convert.KIND_TO_PROTO[k] for k in kinds}:
                continue
            response.scorers.append(
                scoring_pb2.Scorer(
                    name=described["name"],
                    description=described["description"],
                    model_kind=SLOT_PROTO_KIND[slot],
                    models=[card.ref for card in cards if card.kind in kinds],
                    params=[_param_proto(p) for p in described["params"]],
                    differentiable=described["differentiable"],
                    per_image=described["per_image"],
                )
            )
        return response

    def Score(self, request: scoring_pb2.ScoreRequest, context: grpc.ServicerContext) -> scoring_pb2.ScoreResponse:
        images = validation.images(request.images, "images", self.limits)
        if not request.outputs:
            raise invalid_argument("outputs", "ask for at least one output", "NO_OUTPUTS")
        default = request.model if request.HasField("model") else None
        requested = [self._output(o, f"outputs[{i}]", default, grad=False) for i, o in enumerate(request.outputs)]
        _unique_keys(requested, "outputs[{}].key")
        plan = ScorePlan(tuple(r.plan for r in requested), tuple(images.shape[1:]))
        values = self.batchers.get(plan.models, lambda: self._run).call(plan, [images], context)
        return scoring_pb2.ScoreResponse(outputs=[_output_proto(r, v) for r, v in zip(requested, values, strict=True)])

    def ScoreGrad(
        self, request: scoring_pb2.ScoreGradRequest, context: grpc.ServicerContext
    ) -> scoring_pb2.ScoreGradResponse:
        images = validation.images(request.images, "images", self.limits)
        if not request.terms:
            raise invalid_argument("terms", "an objective needs at least one term", "NO_TERMS")
        default = request.model if request.HasField("model") else None
        requested = [
            self._output(t.output, f"terms[{i}].output", default, grad=True) for i, t in enumerate(request.terms)
        ]
        weights = tuple(_weight(t.weight, f"terms[{i}].weight") for i, t in enumerate(request.terms))
        _one_model_per_slot(requested)
        plan = ScorePlan(tuple(r.plan for r in requested), tuple(images.shape[1:]), weights)
        total, grad, *terms = self.batchers.get(plan.models, lambda: self._run).call(plan, [images], context, grad=True)
        return scoring_pb2.ScoreGradResponse(
            values=convert.float_tensor(total),
            grad_images=convert.float_tensor(grad),
            terms=[_output_proto(r, v) for r, v in zip(requested, terms, strict=True)],
        )

    # --- request -> plan ------------------------------------------------------------------------------------------

    def _output(
        self, output: scoring_pb2.OutputRequest, field: str, default: common_pb2.ModelRef | None, *, grad: bool
    ) -> _Requested:
        spec = scorers.get_output(output.output, field=field)
        params = scorers.validate_params(spec.name, json_format.MessageToDict(output.params), field=field)
        noise = self._noise(output, field, spec, grad)
        if grad:
            if not spec.differentiable:
                raise invalid_argument(f"{field}.output", f"{spec.name!r} is not differentiable", "NOT_DIFFERENTIABLE")
            if spec.shape != "(N,)":
                raise invalid_argument(
                    f"{field}.output",
                    f"{spec.name!r} gives {spec.shape} values; a term needs one number per image",
                    "NOT_SCALAR",
                )
        card = self._model_for(spec, output, field, default)
        onnx = card is not None and not grad and spec.model in _ONNX_SLOTS and self.store.uses_onnx(card)
        plan = OutputPlan(
            spec.name, tuple(sorted(params.items())), spec.model, None if card is None else card.ref, onnx
        )
        return _Requested(plan, output.key or spec.name, card, noise)

    @staticmethod
    def _noise(
        output: scoring_pb2.OutputRequest, field: str, spec: scorers.OutputSpec, grad: bool
    ) -> scorers.BinomialNoise | None:
        if not output.HasField("noise"):
            return None
        if grad:
            raise invalid_argument(f"{field}.noise", "noise is not differentiable; leave it out of objectives")
        if not spec.is_rate:
            raise invalid_argument(f"{field}.noise", f"{spec.name!r} is not a rate in [0, 1]; noise applies to rates")
        if output.noise.impressions < 1:
            raise invalid_argument(f"{field}.noise.impressions", f"must be positive, got {output.noise.impressions}")
        return scorers.BinomialNoise(output.noise.impressions, output.noise.seed)

    def _model_for(
        self,
        spec: scorers.OutputSpec,
        output: scoring_pb2.OutputRequest,
        field: str,
        default: common_pb2.ModelRef | None,
    ) -> ModelCard | None:
        if spec.model is None:
            return None
        ref = output.model if output.HasField("model") else default
        if ref is None:
            raise invalid_argument(
                f"{field}.model",
                f"{spec.name!r} needs a {spec.model.replace('_', ' ')}: name one here or in the request's `model`",
                "MISSING_MODEL",
            )
        ref_field = f"{field}.model" if output.HasField("model") else "model"
        try:
            card = self.store.card(validation.model_ref(ref, ref_field))
        except ModelNotFound as error:
            raise not_found(ref_field, error.message, "UNKNOWN_MODEL") from None
        if card.kind not in SLOT_KINDS[spec.model]:
            raise invalid_argument(
                ref_field,
                f"{card.ref} is a {card.kind}; {spec.name!r} needs a {' or '.join(SLOT_KINDS[spec.model])}",
                "WRONG_MODEL_KIND",
            )
        if spec.model == "feature_extractor" and not hasattr(self.store.torch_model(card), "features"):
            raise invalid_argument(ref_field, f"{card.ref} exposes no features()", "NO_FEATURES")
        return card

    # --- running --------------------------------------------------------------------------------------------------

    def _run(self, plan: Hashable, inputs: Sequence[Tensor]) -> list[Tensor]:
        """The batch function of every scoring batcher: the plan's outputs (or objective and gradient) on images."""
        assert isinstance(plan, ScorePlan)
        images = inputs[0]
        if plan.weights is not None:
            models = self._merged_models(plan.outputs)
            terms = [(o.name, dict(o.params), w) for o, w in zip(plan.outputs, plan.weights, strict=True)]
            total, grad, values = scorers.objective_and_grad(images, models, terms)
            return [total, grad, *values]
        with scorers.shared_forwards():
            return [
                scorers.compute_output(o.name, images, self._scoring_models(o), dict(o.params), field=f"outputs[{i}]")
                for i, o in enumerate(plan.outputs)
            ]

    def _scoring_models(self, output: OutputPlan) -> scorers.ScoringModels:
        if output.slot is None or output.ref is None:
            return scorers.ScoringModels()
        key = (output.slot, output.ref, output.onnx)
        with self._lock:
            models = self._models.get(key)
        if models is None:
            models = self._build_models(output)
            with self._lock:
                models = self._models.setdefault(key, models)
        return models

    def _build_models(self, output: OutputPlan) -> scorers.ScoringModels:
        assert output.slot is not None and output.ref is not None
        with torch.inference_mode(False):  # built on a batcher thread; ScoreGrad differentiates through them later
            card = self.store.card(output.ref)
            model = self.store.onnx_model(card) if output.onnx else self.store.torch_model(card)
            fields: dict[str, Any] = {output.slot: ImageInput(model, card)}
            if output.slot == "classifier":
                fields["classifier_class_names"] = tuple(card.class_names or ())
            return scorers.ScoringModels(**fields)

    def _merged_models(self, outputs: Sequence[OutputPlan]) -> scorers.ScoringModels:
        fields: dict[str, Any] = {}
        for output in outputs:
            if output.slot is not None:
                single = self._scoring_models(output)
                fields[output.slot] = getattr(single, output.slot)
                if output.slot == "classifier":
                    fields["classifier_class_names"] = single.classifier_class_names
        return scorers.ScoringModels(**fields)


def _weight(weight: float, field: str) -> float:
    if not math.isfinite(weight):
        raise invalid_argument(field, f"must be a finite number, got {weight}")
    return float(weight)


def _unique_keys(requested: Sequence[_Requested], field: str) -> None:
    seen: dict[str, int] = {}
    for index, item in enumerate(requested):
        if item.key in seen:
            raise invalid_argument(
                field.format(index),
                f"key {item.key!r} is used by outputs[{seen[item.key]}] too; give each output a unique key",
                "DUPLICATE_KEY",
            )
        seen[item.key] = index


def _one_model_per_slot(requested: Sequence[_Requested]) -> None:
    """One objective uses one model of each kind (ScoringModels holds one per field)."""
    chosen: dict[str, tuple[int, str]] = {}
    for index, item in enumerate(requested):
        slot, ref = item.plan.slot, item.plan.ref
        if slot is None or ref is None:
            continue
        if slot in chosen and chosen[slot][1] != ref:
            first, other = chosen[slot]
            raise invalid_argument(
                f"terms[{index}].output.model",
                f"one objective uses one {slot.replace('_', ' ')}: terms[{first}] uses {other}, this term {ref}",
                "MIXED_MODELS",
            )
        chosen.setdefault(slot, (index, ref))


def _output_proto(requested: _Requested, values: Tensor) -> scoring_pb2.ScoreOutput:
    if requested.noise is not None:
        values = scorers.apply_binomial_noise(values, requested.noise.impressions, requested.noise.seed)
    array = values.detach().cpu().numpy()
    message = scoring_pb2.ScoreOutput(
        key=requested.key, values=to_tensor_proto(array if array.dtype.kind != "f" else array.astype("float32"))
    )
    if requested.card is not None:
        message.model.CopyFrom(convert.ref_proto(requested.card))
    return message


def _param_proto(param: dict[str, Any]) -> scoring_pb2.ScorerParam:
    required = param.get("required", False)
    default = "" if required else json.dumps(param.get("default"))
    return scoring_pb2.ScorerParam(
        name=param["name"], type=param["type"], default_json=default, description=param.get("doc", "")
    )
