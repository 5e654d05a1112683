"""The model card (`model.json`): everything a service needs to know about a model before loading it.

A card is checked strictly when it is read, so that a typo or a missing field fails at registration with a message
naming the file and the field, not later as a shape error deep inside a job. Unknown top-level keys are refused
(they are almost always typos); free-form data goes under `metrics` or `extra`.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from gansteer_server.models.errors import ModelRegistryError

CARD_FILE = "model.json"
KINDS = ("generator", "discriminator", "classifier", "pir_estimator", "feature_extractor")
FORMATS = ("safetensors", "torchscript", "onnx", "torchvision")
PRIOR_TYPES = ("standard_normal", "gaussian")
# Formats whose weights go into a module the project builds from `architecture` and `architecture_kwargs`.
ARCHITECTURE_FORMATS = ("safetensors", "torchvision")

# Names appear in folder names (`name@version`) and URLs: no "@", "/" or leading dot.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_REQUIRED = ("name", "version", "kind", "format", "weights")


@dataclass(frozen=True)
class LatentPrior:
    """How a generator's z is drawn: standard normal, or a Gaussian fitted to good latents (mean and covariance
    in a safetensors file beside the weights), which keeps sampling where the generator does well."""

    type: str = "standard_normal"
    mean_cov: str | None = None

    def __post_init__(self) -> None:
        if self.type not in PRIOR_TYPES:
            raise ModelRegistryError(
                f"unknown prior type {self.type!r} (expected one of: {', '.join(PRIOR_TYPES)})",
                field="latent_prior.type",
            )
        if self.type == "gaussian" and self.mean_cov is None:
            raise ModelRegistryError(
                "a gaussian prior needs 'mean_cov', a .safetensors file holding 'mean' and 'covariance'",
                field="latent_prior.mean_cov",
            )
        if self.type == "standard_normal" and self.mean_cov is not None:
            raise ModelRegistryError("a standard_normal prior takes no 'mean_cov'", field="latent_prior.mean_cov")
        if self.mean_cov is not None:
            check_file_name(self.mean_cov, "latent_prior.mean_cov")

    @classmethod
    def from_dict(cls, data: Any) -> LatentPrior:
        _check_keys(data, "latent_prior", allowed=("type", "mean_cov"), required=("type",))
        return cls(type=_str(data["type"], "latent_prior.type"), mean_cov=data.get("mean_cov"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type} if self.mean_cov is None else {"type": self.type, "mean_cov": self.mean_cov}


@dataclass(frozen=True)
class InputNormalization:
    """Per-channel mean and std that a classifier expects: it is fed (x - mean) / std of an image whose pixels lie
    in the card's `value_range` (torchvision classifiers: value range [0, 1] and the ImageNet statistics)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _numbers(self.mean, "input_normalization.mean"))
        object.__setattr__(self, "std", _numbers(self.std, "input_normalization.std"))
        if len(self.mean) != len(self.std):
            raise ModelRegistryError(
                f"mean has {len(self.mean)} values but std has {len(self.std)}", field="input_normalization"
            )
        if any(s <= 0 for s in self.std):
            raise ModelRegistryError("every std must be positive", field="input_normalization.std")

    @classmethod
    def from_dict(cls, data: Any) -> InputNormalization:
        _check_keys(data, "input_normalization", allowed=("mean", "std"), required=("mean", "std"))
        return cls(mean=data["mean"], std=data["std"])

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class ModelCard:
    """One model version. `resolution`, `channels` and `value_range` describe the images a generator produces or
    a discriminator / classifier / estimator consumes; `weights`, `onnx` and the prior's file are names of files in
    the card's own folder."""

    name: str
    version: int
    kind: str
    format: str
    weights: str
    architecture: str | None = None
    architecture_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    latent_size: int | None = None
    latent_prior: LatentPrior | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    embedding_size: int | None = None
    resolution: int | None = None
    channels: int = 3
    value_range: tuple[float, float] | None = None
    input_normalization: InputNormalization | None = None
    onnx: str | None = None
    description: str = ""
    created: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict, hash=False)
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        self._check_identity()
        self._check_files()
        self._check_shapes()
        self._check_kind_requirements()
        _str(self.description, "description")
        if self.created is not None:
            try:
                datetime.fromisoformat(_str(self.created, "created"))
            except ValueError:
                raise ModelRegistryError(f"{self.created!r} is not an ISO 8601 timestamp", field="created") from None
        for name in ("architecture_kwargs", "metrics", "extra"):
            _json_object(getattr(self, name), name)

    @property
    def ref(self) -> str:
        """The `name@version` reference that names this model everywhere (folders, ModelRef in the protos)."""
        return f"{self.name}@{self.version}"

    @property
    def files(self) -> tuple[str, ...]:
        """The files this card names, all of which must lie in its folder."""
        names = [self.weights]
        if self.onnx is not None:
            names.append(self.onnx)
        if self.latent_prior is not None and self.latent_prior.mean_cov is not None:
            names.append(self.latent_prior.mean_cov)
        return tuple(names)

    @classmethod
    def from_dict(cls, data: Any, path: Path | str | None = None) -> ModelCard:
        """Parse a card's JSON object; errors name `path` (the card file) and the field at fault."""
        try:
            _check_keys(data, "card", allowed=tuple(f.name for f in fields(cls)), required=_REQUIRED)
            values = dict(data)
            if values.get("latent_prior") is not None:
                values["latent_prior"] = LatentPrior.from_dict(values["latent_prior"])
            if values.get("input_normalization") is not None:
                values["input_normalization"] = InputNormalization.from_dict(values["input_normalization"])
            return cls(**values)
        except ModelRegistryError as error:
            raise (error.at(path) if path is not None else error) from None

    @classmethod
    def from_json(cls, text: str, path: Path | str | None = None) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelRegistryError(f"not valid JSON: {error}", path=path) from None
        return cls.from_dict(data, path)

    @classmethod
    def from_file(cls, path: Path | str) -> ModelCard:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelRegistryError("the model card is missing", path=path) from None
        except UnicodeDecodeError:
            raise ModelRegistryError("the model card is not UTF-8 text", path=path) from None
        return cls.from_json(text, path)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this card; optional fields left at their defaults are omitted."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name in ("architecture_kwargs", "metrics", "extra", "description") and not value):
                continue
            if isinstance(value, (LatentPrior, InputNormalization)):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = copy.deepcopy(value)  # callers may edit the result without touching this frozen card
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def _check_identity(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(NAME_PATTERN, self.name):
            raise ModelRegistryError(
                f"{self.name!r} is not a model name (letters, digits, '.', '_', '-'; at most 100; no '@' or '/')",
                field="name",
            )
        _int(self.version, "version", minimum=1)
        if self.kind not in KINDS:
            raise ModelRegistryError(f"unknown kind {self.kind!r} (expected one of: {', '.join(KINDS)})", field="kind")
        if self.format not in FORMATS:
            raise ModelRegistryError(
                f"unknown format {self.format!r} (expected one of: {', '.join(FORMATS)})", field="format"
            )
        if self.architecture is not None:
            _str(self.architecture, "architecture", allow_empty=False)
        if self.format in ARCHITECTURE_FORMATS and self.architecture is None:
            raise ModelRegistryError(f"a {self.format} model needs 'architecture'", field="architecture")
        if self.architecture_kwargs and self.format not in ARCHITECTURE_FORMATS:
            raise ModelRegistryError(
                f"'architecture_kwargs' applies only to the {' and '.join(ARCHITECTURE_FORMATS)} formats",
                field="architecture_kwargs",
            )
        if self.format == "torchvision" and self.kind not in ("classifier", "feature_extractor"):
            raise ModelRegistryError("torchvision models are classifiers or feature extractors", field="kind")

    def _check_files(self) -> None:
        check_file_name(self.weights, "weights")
        if self.onnx is not None:
            check_file_name(self.onnx, "onnx")
            if self.format == "onnx":
                raise ModelRegistryError("an onnx-format model is already ONNX; drop 'onnx'", field="onnx")
        if self.latent_prior is not None and not isinstance(self.latent_prior, LatentPrior):
            raise ModelRegistryError("expected an object with 'type'", field="latent_prior")
        if len(set(self.files)) != len(self.files):
            raise ModelRegistryError(f"the card names one file twice: {list(self.files)}", field="weights")

    def _check_shapes(self) -> None:
        for name in ("latent_size", "num_classes", "embedding_size", "resolution"):
            if getattr(self, name) is not None:
                _int(getattr(self, name), name, minimum=1)
        _int(self.channels, "channels", minimum=1)
        if self.latent_prior is not None and self.latent_size is None:
            raise ModelRegistryError("a latent prior needs 'latent_size'", field="latent_prior")
        if self.latent_size is not None and self.latent_prior is None:
            object.__setattr__(self, "latent_prior", LatentPrior())
        if self.class_names is not None:
            self._check_class_names()
        if self.value_range is not None:
            bounds = _numbers(self.value_range, "value_range")
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ModelRegistryError(
                    f"expected two numbers [low, high] with low < high, got {list(bounds)}", field="value_range"
                )
            object.__setattr__(self, "value_range", bounds)
        norm = self.input_normalization
        if norm is not None:
            if not isinstance(norm, InputNormalization):
                raise ModelRegistryError("expected an object with 'mean' and 'std'", field="input_normalization")
            if len(norm.mean) != self.channels:
                raise ModelRegistryError(
                    f"{len(norm.mean)} values for {self.channels} channels", field="input_normalization.mean"
                )

    def _check_class_names(self) -> None:
        if not isinstance(self.class_names, (list, tuple)) or not all(
            isinstance(n, str) and n for n in self.class_names
        ):
            raise ModelRegistryError("expected a list of non-empty strings", field="class_names")
        names = tuple(self.class_names)
        if self.num_classes is None:
            raise ModelRegistryError("'class_names' needs 'num_classes'", field="num_classes")
        if len(names) != self.num_classes:
            raise ModelRegistryError(
                f"{len(names)} class names for num_classes={self.num_classes}", field="class_names"
            )
        if len(set(names)) != len(names):
            raise ModelRegistryError("class names must be distinct", field="class_names")
        object.__setattr__(self, "class_names", names)

    def _check_kind_requirements(self) -> None:
        required = {"generator": ("latent_size", "resolution", "value_range"), "classifier": ("num_classes",)}
        for name in required.get(self.kind, ()):
            if getattr(self, name) is None:
                raise ModelRegistryError(f"a {self.kind} card needs {name!r}", field=name)


def _check_keys(data: Any, where: str, *, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    if not isinstance(data, dict):
        raise ModelRegistryError(f"expected a JSON object, got {type(data).__name__}", field=where)
    prefix = "" if where == "card" else f"{where}."
    unknown = sorted(key for key in data if key not in allowed)
    if unknown:
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(key, allowed, 1))
            else repr(key)
            for key in unknown
        ]
        raise ModelRegistryError(
            f"unknown field(s) {', '.join(hints)}; free-form data goes under 'metrics' or 'extra'",
            field=", ".join(prefix + key for key in unknown),
        )
    for key in required:
        if key not in data:
            raise ModelRegistryError(f"missing required field {key!r}", field=prefix + key)


def check_file_name(value: Any, name: str) -> None:
    """Card files are plain names inside the card's folder, so a card cannot point at files elsewhere on disk."""
    if not isinstance(value, str) or not value or value.startswith(".") or "/" in value or "\\" in value:
        raise ModelRegistryError(f"{value!r} is not a plain file name inside the model's folder", field=name)
    if value == CARD_FILE:
        raise ModelRegistryError(f"{CARD_FILE!r} is the card itself", field=name)


def _str(value: Any, name: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str) or (not allow_empty and not value):
        raise ModelRegistryError(
            f"expected a {'non-empty ' if not allow_empty else ''}string, got {value!r}", field=name
        )
    return value


def _int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelRegistryError(f"expected an integer, got {value!r}", field=name)
    if value < minimum:
        raise ModelRegistryError(f"must be at least {minimum}, got {value}", field=name)
    return value


def _numbers(value: Any, name: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ModelRegistryError(f"expected a list of numbers, got {value!r}", field=name)
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise ModelRegistryError(f"expected finite numbers, got {item!r}", field=name)
    return tuple(float(item) for item in value)


def _json_object(value: Any, name: str) -> None:
    if not isinstance(value, dict):
        raise ModelRegistryError(f"expected a JSON object, got {type(value).__name__}", field=name)
    _json_value(value, name)


def _json_value(value: Any, name: str) -> None:
    """Free-form fields must still write back as strict JSON (no NaN, no Python objects)."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModelRegistryError(f"{value!r} cannot be written as JSON", field=name)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _json_value(item, f"{name}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ModelRegistryError(f"keys must be strings, got {key!r}", field=name)
            _json_value(item, f"{name}.{key}")
        return
    raise ModelRegistryError(f"{type(value).__name__} is not a JSON value", field=name)
