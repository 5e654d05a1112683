"""A job's product (a tuned generator, a new class embedding) as a new version of a model, with its lineage.

The new version's card is the base card with new weights, `extra.lineage` (base model and version, job id, kind,
spec, seed, code version), the ONNX export and the measured metrics dropped (they describe the base weights, not
these). The generation and scoring services serve it without a restart: `ModelStore` resolves `name` to the newest
version again after at most `RESOLVE_TTL_S`.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from gansteer_server.models.card import ModelCard
from gansteer_server.models.registry import ModelEntry, ModelRegistry


@dataclass(frozen=True)
class Lineage:
    base: str  # `name@version` the product was derived from
    job_id: str
    kind: str
    seed: int
    spec: dict[str, Any] = field(default_factory=dict)  # the job's settings that shaped the product (JSON values)
    code_version: str = ""  # filled by `register_derived` when empty


def register_derived(
    registry: ModelRegistry,
    base: ModelCard,
    module: nn.Module,
    lineage: Lineage,
    *,
    name: str | None = None,
    card_changes: dict[str, Any] | None = None,
    description: str = "",
) -> ModelEntry:
    """Register `module`'s weights as the next version of `name` (default: the base's name). Idempotent by job:
    when a version of `name` already carries this job id (its worker died after registering and the job's last
    segment ran again), that version is returned instead of a second one."""
    existing = _registered_by(registry, name or base.name, lineage.job_id)
    if existing is not None:
        return existing
    if base.format != "safetensors":
        raise ValueError(f"{base.ref} is stored as {base.format}; only built-in architectures can be re-registered")
    stamped = lineage if lineage.code_version else _with_code_version(lineage)
    fields = base.to_dict() | (card_changes or {})
    fields.pop("onnx", None)
    fields.pop("metrics", None)
    fields.pop("version", None)
    fields.pop("created", None)
    fields["name"] = name or base.name
    fields["description"] = description or f"{stamped.kind} of {base.ref} by job {stamped.job_id}"
    fields["extra"] = dict(base.extra) | {"lineage": asdict(stamped)}
    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    files: dict[str, Path | bytes] = {base.weights: safetensors.torch.save(state)}
    base_folder = registry.resolve(base.ref).folder
    if base.latent_prior is not None and base.latent_prior.mean_cov is not None:
        files[base.latent_prior.mean_cov] = base_folder / base.latent_prior.mean_cov
    return registry.register(fields["name"], fields, files)


def _registered_by(registry: ModelRegistry, name: str, job_id: str) -> ModelEntry | None:
    for version in reversed(registry.versions(name)):
        entry = registry.resolve(f"{name}@{version}")
        recorded = entry.card.extra.get("lineage")
        if isinstance(recorded, dict) and recorded.get("job_id") == job_id:
            return entry
    return None


def code_version() -> str:
    """The package version, plus the git commit when the code runs from a checkout."""
    version = metadata.version("gansteer-server")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}" if commit else version


def _with_code_version(lineage: Lineage) -> Lineage:
    return Lineage(**(asdict(lineage) | {"code_version": code_version()}))


def register_trained(
    registry: ModelRegistry, name: str, card: dict[str, Any], module: nn.Module, lineage: Lineage
) -> ModelEntry:
    """Register a model a job trained from scratch or from a backbone (a PIR estimator) as the next version of
    `name`, its lineage in `extra.lineage` (`base`: the backbone). Idempotent by job, as `register_derived` is."""
    existing = _registered_by(registry, name, lineage.job_id)
    if existing is not None:
        return existing
    stamped = lineage if lineage.code_version else _with_code_version(lineage)
    fields = dict(card) | {"name": name, "format": "safetensors", "weights": "weights.safetensors"}
    fields["extra"] = dict(card.get("extra") or {}) | {"lineage": asdict(stamped)}
    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    return registry.register(name, fields, {"weights.safetensors": safetensors.torch.save(state)})
