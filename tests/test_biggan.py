"""A user registers a BigGAN checkpoint folder of the PyTorch port (`pytorch-pretrained-biggan`: `config.json` beside
`pytorch_model.bin`) and gets a conditional generator whose class rows embedding AM can edit.

The tests build a tiny BigGAN-deep (channel width 4, 32 px, 5 classes) and save it as the port would. That our
network computes what the port's does was checked separately against `pytorch_pretrained_biggan` 0.1.1 (tiny and
128-pixel configurations, truncations 0.05 to 1, bit for bit); `biggan_128_state_dict.json` was written from the
port's own `BigGAN(BigGANConfig())` (key -> shape, in state_dict order). Nothing here downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor

from gansteer_server.models import ModelRegistry, ModelRegistryError
from gansteer_server.models.architectures.biggan import PORT_CONFIG, BigGAN, register_biggan
from gansteer_server.models.conditional import ConditionalGenerator
from gansteer_server.models.lineage import Lineage, register_derived
from gansteer_server.servers.sampling import draw_latents, seeded_generator

FIXTURE = Path(__file__).parent / "fixtures" / "biggan_128_state_dict.json"
TINY: dict[str, Any] = {
    "output_dim": 32,
    "z_dim": 8,
    "class_embed_dim": 8,
    "channel_width": 4,
    "num_classes": 5,
    "layers": [[False, 16, 16], [True, 16, 8], [True, 8, 4], [True, 4, 2], [False, 2, 1]],
    "attention_layer_position": 3,
    "eps": 1e-4,
    "n_stats": 51,
}


def trained_biggan(truncation: float = 0.4, **changes: Any) -> BigGAN:
    """A tiny BigGAN whose standing statistics and attention gain differ from their defaults, as a trained one's."""
    torch.manual_seed(0)
    model = BigGAN(**{**TINY, **changes}, truncation=truncation)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_means"):
                buffer.normal_(0, 0.3)
            elif name.endswith("running_vars"):
                buffer.uniform_(0.5, 2)
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(0.5)
    return model.eval()


def port_folder(folder: Path, model: BigGAN, config: Any = None) -> Path:
    """The folder the port's users hold: its config and `torch.save(model.state_dict())`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY if config is None else config))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def generator(registry: ModelRegistry, ref: str) -> ConditionalGenerator:
    return ConditionalGenerator(registry.load(ref), registry.card(ref))  # type: ignore[arg-type]


def images(model: Any, z: Tensor, condition: Tensor) -> Tensor:
    with torch.no_grad():
        return model(z, condition)  # type: ignore[no-any-return]


def test_a_port_folder_registers_and_generates_the_original_images(registry: ModelRegistry, tmp_path: Path) -> None:
    original = trained_biggan(truncation=0.5)
    entry = register_biggan(registry, "biggan-tiny", port_folder(tmp_path / "port", original), truncation=0.5)

    card = entry.card
    assert (card.ref, card.kind, card.architecture) == ("biggan-tiny@1", "generator", "biggan")
    assert (card.latent_size, card.num_classes, card.embedding_size, card.resolution) == (8, 5, 8, 32)
    assert card.value_range == (-1.0, 1.0)
    assert sorted(p.name for p in entry.folder.iterdir()) == [
        "config.json",
        "model.json",
        "prior.safetensors",
        "weights.safetensors",  # the state dict as plain tensors: no pickle enters the registry
    ]
    z, classes = torch.randn(4, 8), torch.tensor([0, 3, 1, 4])
    loaded = generator(registry, "biggan-tiny")
    generated = images(loaded, z, classes)
    assert generated.shape == (4, 3, 32, 32) and generated.abs().max() <= 1 and generated.std() > 0.01
    torch.testing.assert_close(generated, images(original, z, classes), rtol=0, atol=0)


def test_the_latent_prior_samples_as_the_ports_truncated_noise(registry: ModelRegistry, tmp_path: Path) -> None:
    register_biggan(registry, "biggan-tiny", port_folder(tmp_path / "port", trained_biggan()), truncation=0.4)
    prior = registry.latent_prior("biggan-tiny")
    assert prior is not None
    mean, covariance = prior
    torch.testing.assert_close(covariance, 0.16 * torch.eye(8))
    # The card's advice: truncation 2 on this prior draws truncation * TruncatedNormal(-2, 2), as the port samples.
    assert registry.card("biggan-tiny").extra["latent_truncation"] == 2.0
    z = draw_latents(seeded_generator(0), 256, 8, (mean, covariance), truncation=2.0)
    assert z.abs().max() <= 0.8 + 1e-6 and 0.3 < z.std() < 0.4


def test_class_ids_and_free_embedding_vectors_give_the_same_images(registry: ModelRegistry, tmp_path: Path) -> None:
    original = trained_biggan()
    register_biggan(registry, "biggan-tiny", port_folder(tmp_path / "port", original))
    loaded = generator(registry, "biggan-tiny")
    z, classes = torch.randn(3, 8), torch.tensor([2, 0, 4])
    rows = loaded.class_embeddings()
    assert rows is not None and rows.shape == (5, 8)
    # The port's own path: a one-hot through its `embeddings` Linear.
    port_vectors = F.one_hot(classes, 5).float() @ original.state_dict()["embeddings.weight"].T
    by_id = images(loaded, z, classes)
    torch.testing.assert_close(images(loaded, z, rows[classes]), by_id, rtol=0, atol=0)
    torch.testing.assert_close(images(loaded, z, port_vectors), by_id, rtol=0, atol=0)


def test_replacing_a_class_row_changes_that_class_and_no_other(registry: ModelRegistry, tmp_path: Path) -> None:
    register_biggan(registry, "biggan-tiny", port_folder(tmp_path / "port", trained_biggan()))
    loaded = generator(registry, "biggan-tiny")
    z, classes = torch.randn(5, 8), torch.arange(5)
    before = images(loaded, z, classes)
    new_row, appended = torch.randn(8), torch.randn(8)

    edited = loaded.with_class_rows({2: new_row, 5: appended})

    after = images(edited, z, classes)
    assert not torch.allclose(after[2], before[2], atol=1e-3)
    torch.testing.assert_close(after[[0, 1, 3, 4]], before[[0, 1, 3, 4]], rtol=0, atol=0)
    torch.testing.assert_close(images(loaded, z, classes), before, rtol=0, atol=0)  # the original is untouched
    torch.testing.assert_close(
        images(edited, z[:1], torch.tensor([5])), images(edited, z[:1], appended[None]), rtol=0, atol=0
    )
    assert edited.card.num_classes == 6
    # The edited copy still saves in the port's layout, its new rows included.
    port_table = edited.module.state_dict()["embeddings.weight"]
    assert port_table.shape == (8, 6) and torch.equal(port_table[:, 2], new_row)


def test_a_learned_row_registers_as_a_new_version_that_serves_it(registry: ModelRegistry, tmp_path: Path) -> None:
    """What an embedding-AM job publishes for a new label: the base plus one row, as the next version."""
    register_biggan(registry, "biggan-tiny", port_folder(tmp_path / "port", trained_biggan()))
    base = generator(registry, "biggan-tiny")
    appended = torch.randn(8)
    edited = base.with_class_rows({5: appended})
    lineage = Lineage(base="biggan-tiny@1", job_id="job-1", kind="embedding_am", seed=0)
    changes = {"num_classes": 6, "architecture_kwargs": edited.card.architecture_kwargs}
    entry = register_derived(registry, base.card, edited.module, lineage, card_changes=changes)
    assert entry.ref == "biggan-tiny@2"
    again = register_derived(registry, base.card, edited.module, lineage, card_changes=changes)
    assert again.ref == "biggan-tiny@2"  # idempotent by job: a re-run publishes no second version
    served, z = generator(registry, "biggan-tiny@2"), torch.randn(2, 8)
    torch.testing.assert_close(
        images(served, z, torch.tensor([5, 5])), images(base, z, appended.expand(2, -1)), rtol=0, atol=0
    )


def test_truncation_selects_the_standing_statistics() -> None:
    model = trained_biggan(truncation=0.4)
    z, classes = torch.randn(2, 8), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(z, classes), model(z, classes, truncation=0.4))
        assert not torch.allclose(model(z, classes), model(z, classes, truncation=1.0))
        with pytest.raises(ValueError, match="truncation"):
            model(z, classes, truncation=1.5)


def test_a_safetensors_file_of_the_same_state_dict_registers_too(registry: ModelRegistry, tmp_path: Path) -> None:
    original = trained_biggan()
    folder = tmp_path / "port"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    safetensors.torch.save_file(original.state_dict(), folder / "model.safetensors")

    register_biggan(registry, "biggan-tiny", folder)

    z, classes = torch.randn(2, 8), torch.tensor([3, 0])
    generated = images(generator(registry, "biggan-tiny"), z, classes)
    torch.testing.assert_close(generated, images(original, z, classes), rtol=0, atol=0)


def test_the_128_pixel_layout_is_the_ports() -> None:
    expected = json.loads(FIXTURE.read_text())
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = BigGAN(**PORT_CONFIG)
    assert [(key, list(value.shape)) for key, value in model.state_dict().items()] == list(expected.items())
    assert model.resolution == 128 and BigGAN.__init__.__defaults__[:5] == (128, 128, 128, 128, 1000)  # type: ignore[index]


def test_a_folder_without_config_is_refused_naming_the_file(registry: ModelRegistry, tmp_path: Path) -> None:
    folder = port_folder(tmp_path / "port", trained_biggan())
    (folder / "config.json").unlink()
    with pytest.raises(ModelRegistryError, match=r"config\.json") as caught:
        register_biggan(registry, "biggan-tiny", folder)
    assert caught.value.path == folder / "config.json"
    assert registry.list() == []


def test_a_config_that_does_not_describe_a_biggan_is_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    folder = port_folder(tmp_path / "port", trained_biggan(), config={**TINY, "output_dim": 64})
    with pytest.raises(ModelRegistryError, match="up-sample to 32 pixels, but output_dim is 64") as caught:
        register_biggan(registry, "biggan-tiny", folder)
    assert caught.value.path == folder / "config.json"
    (folder / "config.json").write_text(json.dumps({**TINY, "chanel_width": 4}))
    with pytest.raises(ModelRegistryError, match="unknown key"):
        register_biggan(registry, "biggan-tiny", folder)
    assert registry.list() == []


def test_weights_of_the_wrong_shape_are_refused_naming_file_and_key(registry: ModelRegistry, tmp_path: Path) -> None:
    folder = port_folder(tmp_path / "port", trained_biggan(channel_width=8))
    (folder / "config.json").write_text(json.dumps(TINY))  # says width 4; the weights are width 8
    with pytest.raises(ModelRegistryError, match=r"wrong shape.*generator\.gen_z") as caught:
        register_biggan(registry, "biggan-tiny", folder)
    assert caught.value.path == folder / "pytorch_model.bin"
    assert registry.list() == []


def test_a_pickle_that_is_not_a_plain_state_dict_is_refused_unopened(registry: ModelRegistry, tmp_path: Path) -> None:
    folder = port_folder(tmp_path / "port", trained_biggan())
    weights = folder / "pytorch_model.bin"
    marker = tmp_path / "unpickled"
    torch.save({"generator.gen_z.bias": _OpensAFile(marker)}, weights)
    with pytest.raises(ModelRegistryError, match="refused") as caught:
        register_biggan(registry, "biggan-tiny", folder)
    assert caught.value.path == weights and not marker.exists()  # the object was never built

    torch.save({"state_dict": trained_biggan().state_dict(), "epoch": 3}, weights)  # a training checkpoint
    with pytest.raises(ModelRegistryError, match="flat state dict") as caught:
        register_biggan(registry, "biggan-tiny", folder)
    assert caught.value.path == weights

    weights.unlink()
    with pytest.raises(ModelRegistryError, match=r"pytorch_model\.bin, model\.safetensors"):
        register_biggan(registry, "biggan-tiny", folder)
    assert registry.list() == []


class _OpensAFile:
    """A pickled object whose unpickling would create `marker`: what a hostile checkpoint would run instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")
