"""The scoring core: named outputs of scorer models computed on images, pure torch (the scoring servicer calls it).

Every output is a function `fn(images, models, **params) -> Tensor` behind a registry keyed by name, so a request
names it by string and the proto does not change when one is added (STYLE: one interface, many implementations).
Images are NCHW float in [-1, 1]; every output has one row per image (first dim N), independent of the other images
in the batch (models must be in eval mode), and is differentiable w.r.t. the images unless registered otherwise.

Errors a client can cause raise `ScorerInputError` naming the request field, relative to the output spec
(`params.k`, `model`, `output`), prefixed with `field=` by the callers (`outputs[0]` gives `outputs[0].params.k`).

A Score request computes each output with `compute_output` inside one `shared_forwards()` block (one forward per
model); ScoreGrad calls `objective_and_grad`. This module holds the registry and the model outputs (classifier,
discriminator, feature extractor, PIR estimator); `objectives` holds seed 000's model-free and feature objectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Impressions per image in the seed's simulated data (seed 000, section 2.2: 1000 images shown 1000 times each).
DEFAULT_IMPRESSIONS = 1000
#: The PIR estimator's softmax temperature when used, not trained (seed 000, appendix C.3).
DEFAULT_PIR_TEMPERATURE = 0.01

_PARAM_TYPES = ("int", "float", "str", "bool")
_MODEL_FIELDS = ("classifier", "discriminator", "feature_extractor", "pir_estimator")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class ScorerInputError(ValueError):
    """A request the scoring core cannot serve; `field` names the request field at fault (INVALID_ARGUMENT).

    Fields are relative to the output spec (`params.k`) except those naming the request's `images`, which are
    absolute; `prefixed` places the former under a spec's own field (`outputs[0]`).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field, self.message = field, message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def prefixed(self, prefix: str) -> ScorerInputError:
        """The same error with its field placed under `prefix` (e.g. `terms[2].output`)."""
        if self.field == "images" or self.field.startswith("images."):
            return self
        return type(self)(_join(prefix, self.field), *self.args[1:])


class UnknownOutputError(ScorerInputError):
    """No output has this name (the servicer answers NOT_FOUND)."""


class MissingModelError(ScorerInputError):
    """The output needs a model that the request did not provide; `model_field` is the `ScoringModels` field."""

    def __init__(self, field: str, message: str, model_field: str) -> None:
        super().__init__(field, message)
        self.args = (field, message, model_field)
        self.model_field = model_field


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of an output. `default=None` with `required=False` means optional and absent by default."""

    type: str
    default: Any = None
    doc: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    required: bool = False

    def __post_init__(self) -> None:
        if self.type not in _PARAM_TYPES:
            raise ValueError(f"param type {self.type!r} is not one of {_PARAM_TYPES}")

    def validate(self, value: Any, field: str) -> Any:
        """The value converted to this type, or ScorerInputError naming `field`.

        Integral floats count as ints, because JSON and protobuf Struct carry every number as a double.
        """
        if value is None:
            if self.required:
                raise ScorerInputError(field, "is required")
            return None
        if self.type == "bool":
            if not isinstance(value, bool):
                raise ScorerInputError(field, f"must be a bool, got {value!r}")
            return value
        if self.type == "str":
            if not isinstance(value, str):
                raise ScorerInputError(field, f"must be a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ScorerInputError(field, f"must be one of {list(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScorerInputError(field, f"must be a number ({self.type}), got {value!r}")
        if not math.isfinite(value):
            raise ScorerInputError(field, f"must be finite, got {value!r}")
        if self.type == "int":
            if value != int(value):
                raise ScorerInputError(field, f"must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.min is not None and value < self.min:
            raise ScorerInputError(field, f"must be >= {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise ScorerInputError(field, f"must be <= {self.max}, got {value}")
        return value


@dataclass(frozen=True)
class ScoringModels:
    """The models a request may use; the servicer fills the fields the request names (None: not available).

    `feature_extractor` has `features(x) -> dict[str, Tensor]` (e.g. the built-in `scenes_classifier`).
    Modules must be in eval mode: batch norm in training mode would make one image's score depend on the others
    in its (dynamically merged) batch.
    """

    classifier: nn.Module | None = None
    discriminator: nn.Module | None = None
    feature_extractor: nn.Module | None = None
    pir_estimator: nn.Module | None = None
    classifier_class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in _MODEL_FIELDS:
            module = getattr(self, name)
            if module is not None and module.training:
                raise ValueError(f"ScoringModels.{name} is in training mode; call .eval() before scoring")

    def require(self, name: str, output: str) -> nn.Module:
        """The model `output` needs, or MissingModelError naming the request's `model` field."""
        module = getattr(self, name)
        if module is None:
            raise MissingModelError("model", f"{output!r} needs a {name.replace('_', ' ')}; none was given", name)
        return module


@dataclass(frozen=True)
class BinomialNoise:
    """Simulated responses (seed 000, section 2.2): a rate p observed as Binomial(impressions, p) / impressions."""

    impressions: int = DEFAULT_IMPRESSIONS
    seed: int = 0


@dataclass(frozen=True)
class OutputSpec:
    """A registered output: its function, parameters, the `ScoringModels` field it needs (None: model-free)."""

    name: str
    description: str
    fn: Callable[..., Tensor]
    params: Mapping[str, ParamSpec] = field(default_factory=dict)
    model: str | None = None
    is_rate: bool = False
    differentiable: bool = True
    shape: str = "(N,)"


_OUTPUTS: dict[str, OutputSpec] = {}


def register_output(
    name: str,
    description: str,
    params: Mapping[str, ParamSpec] | None = None,
    *,
    model: str | None = None,
    is_rate: bool = False,
    differentiable: bool = True,
    shape: str = "(N,)",
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Registers `fn(images, models, **params) -> Tensor` under `name`; `is_rate` outputs lie in [0, 1]."""
    if model is not None and model not in _MODEL_FIELDS:
        raise ValueError(f"model {model!r} is not a ScoringModels field {_MODEL_FIELDS}")

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in _OUTPUTS:
            raise ValueError(f"output {name!r} is already registered")
        _OUTPUTS[name] = OutputSpec(name, description, fn, dict(params or {}), model, is_rate, differentiable, shape)
        return fn

    return decorate


def output_names() -> list[str]:
    """The registered output names, sorted."""
    return sorted(_OUTPUTS)


def get_output(name: str, *, field: str = "") -> OutputSpec:
    """The registered output, or UnknownOutputError naming `<field>.output`."""
    if name not in _OUTPUTS:
        raise UnknownOutputError(_join(field, "output"), f"unknown output {name!r}; known: {output_names()}")
    return _OUTPUTS[name]


def describe_outputs() -> list[dict[str, Any]]:
    """Plain-data descriptions of every output, sorted by name, for ListScorers (all outputs are per image)."""
    return [
        {
            **{key: value for key, value in asdict(spec).items() if key not in ("fn", "params")},
            "per_image": True,
            "params": [{"name": param_name, **asdict(param)} for param_name, param in spec.params.items()],
        }
        for spec in (_OUTPUTS[name] for name in output_names())
    ]


def validate_params(name: str, params: Mapping[str, Any] | None, *, field: str = "") -> dict[str, Any]:
    """Every parameter of output `name`, typed, defaults filled in; ScorerInputError names `<field>.params.<p>`."""
    spec = get_output(name, field=field)
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise ScorerInputError(_join(field, "params"), f"must be an object, got {type(params).__name__}")
    for param_name in params:
        if param_name not in spec.params:
            raise ScorerInputError(
                _join(field, f"params.{param_name}"), f"{name!r} has no such parameter; it takes {list(spec.params)}"
            )
    return {
        param_name: param.validate(params.get(param_name, param.default), _join(field, f"params.{param_name}"))
        for param_name, param in spec.params.items()
    }


def apply_binomial_noise(values: Tensor, impressions: int, seed: int) -> Tensor:
    """Binomial(impressions, clamp(values, 0, 1)) / impressions, element-wise (seed 000, section 2.2).

    Sampled on the CPU in float64 with a torch.Generator seeded by `seed`, so the same seed and values give the same
    noise on every machine and device; the result is detached (noise has no gradient) and keeps values' device/dtype.
    """
    if isinstance(impressions, bool) or not isinstance(impressions, int) or impressions < 1:
        raise ScorerInputError("noise.impressions", f"must be a positive integer, got {impressions!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ScorerInputError("noise.seed", f"must be an integer in [0, 2**64), got {seed!r}")
    rates = values.detach().to("cpu", torch.float64)
    if not torch.isfinite(rates).all():
        raise ValueError("binomial noise needs finite rates")
    generator = torch.Generator().manual_seed(seed)
    counts = torch.binomial(torch.full_like(rates, float(impressions)), rates.clamp(0, 1), generator=generator)
    return (counts / impressions).to(values.device, values.dtype)


_FORWARDS: ContextVar[dict[tuple[str, int, int], tuple[Tensor, Tensor]] | None] = ContextVar(
    "scorer_forwards", default=None
)


@contextmanager
def shared_forwards() -> Iterator[None]:
    """Within the block, each model runs once per images tensor however many outputs use it (logits, top_k, ...)."""
    token = _FORWARDS.set({})
    try:
        yield
    finally:
        _FORWARDS.reset(token)


def _forward(kind: str, module: nn.Module, images: Tensor, run: Callable[[], Tensor]) -> Tensor:
    cache = _FORWARDS.get()
    if cache is None:
        return run()
    key = (kind, id(module), id(images))
    if key not in cache:
        cache[key] = (images, run())  # holding the images keeps their id from being reused within the block
    return cache[key][1]


def compute_output(
    name: str,
    images: Tensor,
    models: ScoringModels,
    params: Mapping[str, Any] | None = None,
    *,
    noise: BinomialNoise | None = None,
    field: str = "",
) -> Tensor:
    """Output `name` on `images` (NCHW in [-1, 1]), params validated here; errors name fields under `field`."""
    spec = get_output(name, field=field)
    typed = validate_params(name, params, field=field)
    if noise is not None and not spec.is_rate:
        raise ScorerInputError(_join(field, "noise"), f"{name!r} is not a rate in [0, 1]; noise applies only to rates")
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ScorerInputError("images", "must be a float NCHW tensor")
    try:
        if spec.model is not None:
            models.require(spec.model, name)
        values = spec.fn(images, models, **typed)
        if noise is not None:
            values = apply_binomial_noise(values, noise.impressions, noise.seed)
    except ScorerInputError as error:
        raise error.prefixed(field) from None
    return values


def objective_terms(
    images: Tensor, models: ScoringModels, terms: Sequence[tuple[str, Mapping[str, Any] | None, float]]
) -> tuple[Tensor, list[Tensor]]:
    """sum_t weight_t * output_t(images) (N,) and each term's unweighted values, sharing model forwards.

    Errors name `terms[t].output...` (the ScoreGrad request's fields). A term must be differentiable and give one
    number per image.
    """
    if not terms:
        raise ScorerInputError("terms", "an objective needs at least one term")
    values: list[Tensor] = []
    total: Tensor | None = None
    with shared_forwards():
        for index, (name, params, weight) in enumerate(terms):
            field = f"terms[{index}].output"
            if not get_output(name, field=field).differentiable:
                raise ScorerInputError(_join(field, "output"), f"{name!r} is not differentiable")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ScorerInputError(f"terms[{index}].weight", f"must be a finite number, got {weight!r}")
            value = compute_output(name, images, models, params, field=field)
            if value.shape != (images.shape[0],):
                raise ScorerInputError(
                    _join(field, "output"),
                    f"{name!r} gives shape {tuple(value.shape)}; a term needs one number per image "
                    "(e.g. class_log_prob instead of log_probs)",
                )
            values.append(value)
            total = weight * value if total is None else total + weight * value
    assert total is not None
    return total, values


def objective(
    images: Tensor, models: ScoringModels, terms: Sequence[tuple[str, Mapping[str, Any] | None, float]]
) -> Tensor:
    """The weighted sum of scalar-per-image outputs (N,) that ScoreGrad differentiates."""
    return objective_terms(images, models, terms)[0]


def objective_and_grad(
    images: Tensor, models: ScoringModels, terms: Sequence[tuple[str, Mapping[str, Any] | None, float]]
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The objective (N,), its gradient w.r.t. the images (N, C, H, W) and the terms' values, all detached.

    Uses torch.autograd.grad on the images alone, so the models' parameters gather no `.grad` (safe to run
    concurrently on shared models); call it outside `torch.inference_mode()`. Each image's objective depends only on
    that image, so the gradient of the sum is every image's own gradient.
    """
    with torch.enable_grad():
        leaf = images.detach().clone().requires_grad_(True)  # a copy, also of an inference-mode tensor
        total, values = objective_terms(leaf, models, terms)
        if total.requires_grad:
            (grad,) = torch.autograd.grad(total.sum(), leaf)
        else:
            grad = torch.zeros_like(leaf)
    return total.detach(), grad, [value.detach() for value in values]


# --- classifier outputs ------------------------------------------------------------------------------------------

_CLASS_ID = ParamSpec("int", required=True, min=0, doc="class index of the classifier's output")
_TOP_K = ParamSpec("int", default=5, min=1, doc="number of classes, most probable first")


def _logits(images: Tensor, models: ScoringModels) -> Tensor:
    classifier = models.require("classifier", "classifier output")
    logits = _forward("logits", classifier, images, lambda: classifier(images))
    if logits.dim() != 2 or logits.shape[0] != images.shape[0]:
        raise ScorerInputError("model", f"the classifier gave shape {tuple(logits.shape)}, expected (N, classes)")
    return logits


def _check_class(class_id: int, num_classes: int) -> None:
    if class_id >= num_classes:
        raise ScorerInputError("params.class_id", f"{class_id} is out of range; the model has {num_classes} classes")


def _top_k(images: Tensor, models: ScoringModels, k: int) -> tuple[Tensor, Tensor]:
    log_probs = F.log_softmax(_logits(images, models), dim=1)
    if k > log_probs.shape[1]:
        raise ScorerInputError("params.k", f"{k} exceeds the classifier's {log_probs.shape[1]} classes")
    return torch.topk(log_probs, k, dim=1)


@register_output("logits", "classifier logits", model="classifier", shape="(N, classes)")
def logits(images: Tensor, models: ScoringModels) -> Tensor:
    return _logits(images, models)


@register_output("log_probs", "classifier log-probabilities (log-softmax)", model="classifier", shape="(N, classes)")
def log_probs(images: Tensor, models: ScoringModels) -> Tensor:
    return F.log_softmax(_logits(images, models), dim=1)


@register_output("probs", "classifier probabilities", model="classifier", is_rate=True, shape="(N, classes)")
def probs(images: Tensor, models: ScoringModels) -> Tensor:
    return F.softmax(_logits(images, models), dim=1)


@register_output("class_logit", "one class's logit", {"class_id": _CLASS_ID}, model="classifier")
def class_logit(images: Tensor, models: ScoringModels, class_id: int) -> Tensor:
    values = _logits(images, models)
    _check_class(class_id, values.shape[1])
    return values[:, class_id]


@register_output("class_log_prob", "one class's log-probability", {"class_id": _CLASS_ID}, model="classifier")
def class_log_prob(images: Tensor, models: ScoringModels, class_id: int) -> Tensor:
    values = F.log_softmax(_logits(images, models), dim=1)
    _check_class(class_id, values.shape[1])
    return values[:, class_id]


@register_output("class_prob", "one class's probability", {"class_id": _CLASS_ID}, model="classifier", is_rate=True)
def class_prob(images: Tensor, models: ScoringModels, class_id: int) -> Tensor:
    return class_log_prob(images, models, class_id).exp()


@register_output(
    "top_k_log_probs",
    "the k largest log-probabilities, descending (their classes: top_k_indices with the same k)",
    {"k": _TOP_K},
    model="classifier",
    shape="(N, k)",
)
def top_k_log_probs(images: Tensor, models: ScoringModels, k: int) -> Tensor:
    return _top_k(images, models, k).values


@register_output(
    "top_k_indices",
    "the class ids of the k most probable classes, most probable first (int64)",
    {"k": _TOP_K},
    model="classifier",
    differentiable=False,
    shape="(N, k)",
)
def top_k_indices(images: Tensor, models: ScoringModels, k: int) -> Tensor:
    return _top_k(images, models, k).indices


# --- discriminator, feature extractor and PIR estimator outputs ----------------------------------------------------


@register_output(
    "realism",
    "the discriminator's raw score, higher = more real; with class_id, the projection discriminator's class term too",
    {"class_id": ParamSpec("int", min=0, doc="class for the projection term; absent: the unconditional score")},
    model="discriminator",
)
def realism(images: Tensor, models: ScoringModels, class_id: int | None) -> Tensor:
    discriminator = models.require("discriminator", "realism")
    if class_id is None:
        score = _forward("realism", discriminator, images, lambda: discriminator(images))
    else:
        num_classes = getattr(discriminator, "num_classes", None)
        if num_classes is None:
            raise ScorerInputError("params.class_id", "this discriminator is not class-conditional")
        _check_class(class_id, num_classes)
        condition = torch.full((images.shape[0],), class_id, dtype=torch.int64, device=images.device)
        score = discriminator(images, condition)
    if score.dim() == 2 and score.shape[1] == 1:
        score = score[:, 0]
    if score.shape != (images.shape[0],):
        raise ScorerInputError("model", f"the discriminator gave shape {tuple(score.shape)}, expected (N,)")
    return score


LAYER_PARAM = ParamSpec("str", required=True, doc="a layer of the feature extractor's features() (built-in: stage1..3)")


def layer_activations(images: Tensor, models: ScoringModels, layer: str) -> Tensor:
    """One layer of the feature extractor's `features()`, computed once per images tensor in `shared_forwards()`."""
    extractor = models.require("feature_extractor", "feature output")
    known = getattr(extractor, "feature_names", None)
    if known is not None and layer not in known:
        raise ScorerInputError("params.layer", f"unknown layer {layer!r}; this feature extractor has {list(known)}")
    features = _forward("features", extractor, images, lambda: extractor.features(images))  # type: ignore[operator]
    if layer not in features:
        raise ScorerInputError("params.layer", f"unknown layer {layer!r}; this feature extractor has {list(features)}")
    return features[layer]


@register_output(
    "features",
    "one layer's activations, flattened per image",
    {"layer": LAYER_PARAM},
    model="feature_extractor",
    shape="(N, D)",
)
def features(images: Tensor, models: ScoringModels, layer: str) -> Tensor:
    return layer_activations(images, models, layer).flatten(1)


@register_output(
    "feature_stats",
    "per-channel spatial mean then standard deviation of one conv layer (the statistics seed 003's criterion matches)",
    {"layer": LAYER_PARAM},
    model="feature_extractor",
    shape="(N, 2 * channels)",
)
def feature_stats(images: Tensor, models: ScoringModels, layer: str) -> Tensor:
    activations = layer_activations(images, models, layer)
    if activations.dim() < 3:
        raise ScorerInputError("params.layer", f"{layer!r} has no spatial dimensions; use `features`")
    flat = activations.flatten(2)
    mean = flat.mean(dim=2)
    std = (flat - mean[:, :, None]).square().mean(dim=2).clamp_min(1e-12).sqrt()
    return torch.cat([mean, std], dim=1)


@register_output(
    "pir",
    "the PIR estimator's expected rate: softmax(logits / temperature) over B equal bins of [0, 1] (seed 000, C.3)",
    {
        "temperature": ParamSpec(
            "float", default=DEFAULT_PIR_TEMPERATURE, min=1e-4, max=100.0, doc="softmax temperature (seed: 0.01)"
        )
    },
    model="pir_estimator",
    is_rate=True,
)
def pir(images: Tensor, models: ScoringModels, temperature: float) -> Tensor:
    """E[PIR] = sum_b softmax(logits / T)_b * (b + 1/2) / B; T = 0.01 acts almost like the modal bin (seed C.3)."""
    estimator = models.require("pir_estimator", "pir")
    bin_logits = _forward("pir", estimator, images, lambda: estimator(images))
    if bin_logits.dim() != 2 or bin_logits.shape[0] != images.shape[0] or bin_logits.shape[1] < 2:
        raise ScorerInputError("model", f"the PIR estimator gave shape {tuple(bin_logits.shape)}, expected (N, bins)")
    bins = bin_logits.shape[1]
    centres = (torch.arange(bins, device=bin_logits.device, dtype=bin_logits.dtype) + 0.5) / bins
    return F.softmax(bin_logits / temperature, dim=1) @ centres


# The simulated interaction objectives (seed 000, appendix C.4) register themselves on import; imported last because
# they build on the registry above.
from gansteer_server.algorithms import objectives  # noqa: E402, F401
