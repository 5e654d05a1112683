"""The conditional-generator interface and derived model versions: class rows read and replaced in a copy, a new
label appended, a trainable copy, and a tuned product registered with its lineage and served without a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from job_fixtures import CLASSES, EMBEDDING, GEN, LATENT, build_registry, wait_for
from service_fixtures import make_settings, running

from gansteer.tensors import from_tensor_proto, to_tensor_proto
from gansteer.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from gansteer_server.models.conditional import ConditionalGenerator
from gansteer_server.models.lineage import Lineage, register_derived
from gansteer_server.models.registry import ModelRegistry


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return build_registry(tmp_path / "registry")


def generator(registry: ModelRegistry) -> ConditionalGenerator:
    module = registry.load(GEN)
    assert isinstance(module, torch.nn.Module)
    return ConditionalGenerator(module.eval(), registry.card(GEN))


def test_class_rows_are_read_and_replaced_in_a_copy(registry: ModelRegistry) -> None:
    base = generator(registry)
    table = base.class_embeddings()
    assert table is not None and table.shape == (CLASSES, EMBEDDING)
    z = torch.randn(2, LATENT, generator=torch.Generator().manual_seed(0))
    row = torch.randn(EMBEDDING, generator=torch.Generator().manual_seed(1))
    edited = base.with_class_rows({2: row})
    with torch.no_grad():
        assert torch.allclose(edited(z, torch.tensor([2, 2])), base(z, row.expand(2, -1)), atol=1e-6)
        assert torch.equal(base.class_embeddings(), table)  # the original is untouched
        assert torch.equal(edited(z, torch.tensor([1, 1])), base(z, torch.tensor([1, 1])))


def test_a_new_label_is_appended_as_a_row(registry: ModelRegistry) -> None:
    base = generator(registry)
    row = torch.randn(EMBEDDING)
    extended = base.with_class_rows({CLASSES: row})
    assert extended.card.num_classes == CLASSES + 1
    assert torch.equal(extended.class_embeddings()[CLASSES], row)
    with pytest.raises(ValueError, match="must follow"):
        base.with_class_rows({CLASSES + 3: row})


def test_a_trainable_copy_takes_gradients_and_leaves_the_served_module_frozen(registry: ModelRegistry) -> None:
    base = generator(registry)
    for parameter in base.module.parameters():
        parameter.requires_grad_(False)
    copy = base.trainable_copy()
    z = torch.randn(3, LATENT)
    copy(z, torch.tensor([0, 1, 2])).square().mean().backward()
    assert all(p.grad is not None for p in copy.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in base.module.parameters())


def test_a_derived_version_carries_its_lineage_and_is_served_without_a_restart(registry: ModelRegistry) -> None:
    base = generator(registry)
    settings = make_settings(registry)
    request = generation_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name=GEN),
        latents=to_tensor_proto(np.ones((1, LATENT), dtype=np.float32)),
        condition=common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=[1])),
        format=common_pb2.IMAGE_FORMAT_TENSOR,
    )
    with running("generation", settings) as (_, channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        before = stub.Generate(request, timeout=30)
        assert before.model.version == 1
        tuned = base.with_class_rows({1: torch.full((EMBEDDING,), 0.5)})
        lineage = Lineage(base=base.card.ref, job_id="0" * 24, kind="embedding_am", seed=7, spec={"lr": 0.01})
        entry = register_derived(registry, base.card, tuned.module, lineage)
        assert entry.card.ref == f"{GEN}@2"
        stored = entry.card.extra["lineage"]
        assert stored["base"] == f"{GEN}@1" and stored["job_id"] == "0" * 24 and stored["seed"] == 7
        assert stored["code_version"].startswith("0.1.0")

        def served_new_version() -> generation_pb2.GenerateResponse | None:
            reply = stub.Generate(request, timeout=30)
            return reply if reply.model.version == 2 else None

        after = wait_for(served_new_version, 10, "the new version to be served (resolve TTL)")
        new_images = from_tensor_proto(after.images.tensor)
        with torch.no_grad():
            expected = tuned(torch.ones(1, LATENT), torch.tensor([1])).numpy()
        assert np.allclose(new_images, expected, atol=1e-5)
        assert not np.allclose(new_images, from_tensor_proto(before.images.tensor))
