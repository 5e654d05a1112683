"""The registry as a service and a tuning job use it: cards checked strictly, newest versions resolved across
roots, and new versions appearing atomically even with two writers at once."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import Tensor, nn

from gansteer_server.models import (
    CARD_FILE,
    ModelCard,
    ModelNotFound,
    ModelRegistry,
    ModelRegistryError,
)
from gansteer_server.models.architectures import register_architecture


@register_architecture("test_registry_tiny_classifier")
class TinyClassifier(nn.Module):
    def __init__(self, width: int = 4, num_classes: int = 2) -> None:
        super().__init__()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


CARD: dict[str, Any] = {
    "kind": "classifier",
    "format": "safetensors",
    "architecture": "test_registry_tiny_classifier",
    "architecture_kwargs": {"width": 4},
    "weights": "weights.safetensors",
    "num_classes": 2,
    "class_names": ["day", "night"],
    "resolution": 8,
    "value_range": [-1.0, 1.0],
    "metrics": {"accuracy": 0.97, "per_class": {"day": {"accuracy": 0.98}}},
}


def weights(fill: float = 0.0, width: int = 4) -> bytes:
    """Safetensors bytes of the tiny classifier with every value set to `fill` (so each version is recognisable)."""
    model = TinyClassifier(width=width)
    return safetensors.torch.save({k: torch.full_like(v, fill) for k, v in model.state_dict().items()})


def write_folder(root: Path, folder: str, card: dict[str, Any]) -> Path:
    """A registry folder written by hand, as a user copying a model in would; the card is not checked here."""
    path = root / folder
    path.mkdir(parents=True)
    (path / "weights.safetensors").write_bytes(weights())
    (path / CARD_FILE).write_text(json.dumps(card))
    return path


def full_card(**changes: Any) -> dict[str, Any]:
    card = {"name": "clf", "version": 1, **copy.deepcopy(CARD), **changes}
    return {k: v for k, v in card.items() if v is not None}


def test_a_card_round_trips_through_json() -> None:
    card = ModelCard.from_dict(
        full_card(kind="generator", latent_size=8, latent_prior={"type": "gaussian", "mean_cov": "prior.safetensors"})
    )
    assert ModelCard.from_json(card.to_json()) == card
    assert card.class_names == ("day", "night") and card.value_range == (-1.0, 1.0)
    assert card.files == ("weights.safetensors", "prior.safetensors")


@pytest.mark.parametrize(
    ("changes", "field", "problem"),
    [
        ({"kind": None}, "kind", "missing required field 'kind'"),
        ({"kind": "gennerator"}, "kind", "unknown kind 'gennerator'"),
        ({"format": "pickle"}, "format", "unknown format 'pickle'"),
        ({"version": 0}, "version", "must be at least 1"),
        ({"num_classes": "2"}, "num_classes", "expected an integer"),
        ({"num_classes": 3}, "class_names", "2 class names for num_classes=3"),
        ({"value_range": [0, 1, 2]}, "value_range", "expected two numbers"),
        ({"value_range": [1, 0]}, "value_range", "low < high"),
        ({"architecture": None}, "architecture", "a safetensors model needs 'architecture'"),
        ({"latnet_size": 8}, "latnet_size", "unknown field(s) 'latnet_size' (did you mean 'latent_size'?)"),
        ({"weights": "../elsewhere.safetensors"}, "weights", "not a plain file name"),
        ({"kind": "generator"}, "latent_size", "a generator card needs 'latent_size'"),
        ({"latent_size": 8, "latent_prior": {"type": "gaussian"}}, "latent_prior.mean_cov", "needs 'mean_cov'"),
        ({"input_normalization": {"mean": [0.5], "std": [0.5]}}, "input_normalization.mean", "1 values for 3"),
        ({"metrics": {"fid": float("nan")}}, "metrics.fid", "cannot be written as JSON"),
        ({"created": "yesterday"}, "created", "not an ISO 8601 timestamp"),
    ],
)
def test_a_bad_card_names_its_file_and_field(
    registry: ModelRegistry, changes: dict[str, Any], field: str, problem: str
) -> None:
    folder = write_folder(registry.writable_root, "clf@1", full_card(**changes))

    with pytest.raises(ModelRegistryError) as raised:
        registry.card("clf@1")

    assert raised.value.path == folder / CARD_FILE and raised.value.field == field
    assert f"{folder / CARD_FILE} [{field}]: " in str(raised.value) and problem in str(raised.value)


def test_free_form_metrics_and_extra_accept_any_json(registry: ModelRegistry) -> None:
    entry = registry.register(
        "clf", {**CARD, "extra": {"trained_by": "make zoo", "steps": [1, 2]}}, {"weights.safetensors": weights()}
    )
    assert entry.card.metrics["per_class"]["day"]["accuracy"] == 0.98
    assert registry.card("clf").extra == {"trained_by": "make zoo", "steps": [1, 2]}


def test_register_then_resolve_the_newest_version(registry: ModelRegistry) -> None:
    for fill in (1.0, 2.0, 3.0):
        registry.register("clf", CARD, {"weights.safetensors": weights(fill)})

    assert registry.versions("clf") == [1, 2, 3]
    assert registry.resolve("clf").ref == "clf@3"
    assert registry.resolve("clf@2").card.version == 2
    assert [card.ref for card in registry.list()] == ["clf@1", "clf@2", "clf@3"]
    model = registry.load("clf")
    assert not model.training and torch.all(model.head.weight == 3.0)
    assert torch.all(registry.load("clf@1").head.weight == 1.0)
    assert registry.card("clf@3").created is not None


def test_unknown_names_and_versions_raise_model_not_found(registry: ModelRegistry) -> None:
    registry.register("clf", CARD, {"weights.safetensors": weights()})

    with pytest.raises(ModelNotFound, match="no model named 'nope'"):
        registry.resolve("nope")
    with pytest.raises(ModelNotFound, match=r"'clf' has no version 7 \(versions: 1\)"):
        registry.resolve("clf@7")
    with pytest.raises(ModelRegistryError, match="must be a positive integer"):
        registry.resolve("clf@latest")


def test_registering_weights_of_the_wrong_shape_is_refused_and_leaves_nothing(registry: ModelRegistry) -> None:
    with pytest.raises(ModelRegistryError) as raised:
        registry.register("clf", CARD, {"weights.safetensors": weights(width=5)})

    assert "<bytes given as weights.safetensors> [head.weight]" in str(raised.value)
    assert "[2, 5] in the file, [2, 4] expected" in str(raised.value)
    assert os.listdir(registry.writable_root) == []


def test_a_pickle_offered_as_weights_is_refused_naming_the_file(registry: ModelRegistry, tmp_path: Path) -> None:
    offered = tmp_path / "weights.safetensors"
    torch.save(TinyClassifier().state_dict(), offered)

    with pytest.raises(ModelRegistryError) as raised:
        registry.register("clf", CARD, {"weights.safetensors": offered})

    assert str(raised.value).startswith(f"{offered} [weights]: not a safetensors file")
    assert registry.list() == []


def test_a_bad_card_is_refused_before_anything_is_written(registry: ModelRegistry) -> None:
    with pytest.raises(ModelRegistryError, match=r"<card of clf> \[kind\]: unknown kind 'clasifier'"):
        registry.register("clf", {**CARD, "kind": "clasifier"}, {"weights.safetensors": weights()})
    with pytest.raises(ModelRegistryError, match=r"\[files\]: the card names \['weights.safetensors'\]"):
        registry.register("clf", CARD, {"other.bin": b""})
    assert not registry.writable_root.exists() or os.listdir(registry.writable_root) == []


def test_an_explicit_version_that_exists_is_an_error(registry: ModelRegistry) -> None:
    registry.register("clf", CARD, {"weights.safetensors": weights()}, version=4)
    with pytest.raises(ModelRegistryError, match="clf@4 exists already"):
        registry.register("clf", CARD, {"weights.safetensors": weights()}, version=4)
    assert registry.register("clf", CARD, {"weights.safetensors": weights()}).ref == "clf@5"


def test_read_only_roots_are_searched_and_new_versions_go_to_the_first_root(tmp_path: Path) -> None:
    builtin = tmp_path / "builtin"
    for version in (1, 2):
        write_folder(builtin, f"clf@{version}", full_card(version=version))
    registry = ModelRegistry([tmp_path / "user", builtin])

    assert registry.resolve("clf").ref == "clf@2" and registry.resolve("clf").read_only
    entry = registry.register("clf", CARD, {"weights.safetensors": weights(7.0)})

    assert entry.ref == "clf@3" and entry.folder == tmp_path / "user" / "clf@3" and not entry.read_only
    assert registry.resolve("clf").folder == entry.folder
    assert sorted(os.listdir(builtin)) == ["clf@1", "clf@2"]


def test_leftover_temporary_folders_and_stray_files_are_not_listed(registry: ModelRegistry) -> None:
    registry.register("clf", CARD, {"weights.safetensors": weights()})
    (registry.writable_root / ".tmp-clf-crashed").mkdir()
    (registry.writable_root / ".tmp-clf-crashed" / "weights.safetensors").write_bytes(b"half")
    (registry.writable_root / "notes.txt").write_text("not a model")

    assert [card.ref for card in registry.list()] == ["clf@1"]


def test_a_card_whose_version_disagrees_with_its_folder_is_an_error(registry: ModelRegistry) -> None:
    write_folder(registry.writable_root, "clf@2", full_card(version=1))
    with pytest.raises(ModelRegistryError, match=r"clf@2/model.json \[version\]: the card says version 1"):
        registry.list()


def _register_many(root: str, writer: int, count: int, start: Any) -> None:
    """One writer process: waits for the other, then registers `count` versions as fast as it can."""
    torch.set_num_threads(1)
    registry = ModelRegistry([Path(root)])
    start.wait()
    for i in range(count):
        registry.register("clf", CARD, {"weights.safetensors": weights(100.0 * writer + i)})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writers are forked processes")
def test_two_concurrent_writers_get_distinct_complete_versions(registry: ModelRegistry) -> None:
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    writers = [
        context.Process(target=_register_many, args=(str(registry.writable_root), writer, 10, start))
        for writer in (1, 2)
    ]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    assert [process.exitcode for process in writers] == [0, 0]

    assert registry.versions("clf") == list(range(1, 21))
    fills = sorted(registry.load(f"clf@{v}").head.weight[0, 0].item() for v in range(1, 21))
    assert fills == sorted(100.0 * writer + i for writer in (1, 2) for i in range(10))
    assert sorted(os.listdir(registry.writable_root)) == sorted(f"clf@{v}" for v in range(1, 21))
