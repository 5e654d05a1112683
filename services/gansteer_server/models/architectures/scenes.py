"""The built-in networks trained on the `scenes` data set: a BigGAN-style generator, its projection
discriminator, and small classifiers that also serve as the built-in feature extractor.

Images are NCHW float tensors in [-1, 1]. The generator takes a class either as ids (its shared embedding table
is looked up) or as free embedding vectors, because embedding activation maximisation edits a class's row and
inversion searches a continuous class vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from gansteer_server.models.architectures import register_architecture


def _maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    return _spectral_norm(module) if enabled else module


class ConditionalBatchNorm(nn.Module):
    """Batch norm whose gain and bias are linear functions of a condition vector (BigGAN's shared embedding + z)."""

    def __init__(self, channels: int, condition_size: int, sn: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = _maybe_sn(nn.Linear(condition_size, channels, bias=False), sn)
        self.bias = _maybe_sn(nn.Linear(condition_size, channels, bias=False), sn)

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        gain = 1 + self.gain(condition)[:, :, None, None]
        return self.norm(x) * gain + self.bias(condition)[:, :, None, None]


class GeneratorBlock(nn.Module):
    """Residual up-sampling block: CBN-ReLU-up-conv-CBN-ReLU-conv, plus an up-sampled 1x1 skip."""

    def __init__(self, in_channels: int, out_channels: int, condition_size: int, sn: bool) -> None:
        super().__init__()
        self.bn1 = ConditionalBatchNorm(in_channels, condition_size, sn)
        self.conv1 = _maybe_sn(nn.Conv2d(in_channels, out_channels, 3, padding=1), sn)
        self.bn2 = ConditionalBatchNorm(out_channels, condition_size, sn)
        self.conv2 = _maybe_sn(nn.Conv2d(out_channels, out_channels, 3, padding=1), sn)
        self.skip = _maybe_sn(nn.Conv2d(in_channels, out_channels, 1), sn)

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x, condition)), scale_factor=2.0, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), condition)))
        return h + self.skip(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@register_architecture("scenes_generator")
class ScenesGenerator(nn.Module):
    """Class-conditional generator G(z, class) -> image in [-1, 1].

    As in BigGAN, z is split into one chunk per stage (the first feeds the input layer, the others each block's
    conditional batch norm beside the class embedding), so the latent reaches every resolution.
    """

    def __init__(
        self,
        z_size: int = 128,
        num_classes: int = 10,
        embedding_size: int = 128,
        widths: tuple[int, ...] = (256, 128, 64, 32),
        resolution: int = 32,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        blocks = len(widths) - 1
        if resolution != 4 * 2**blocks:
            raise ValueError(f"{len(widths)} widths give resolution {4 * 2**blocks}, not {resolution}")
        if z_size % (blocks + 1):
            raise ValueError(f"z_size {z_size} does not split into {blocks + 1} equal chunks")
        self.z_size, self.num_classes, self.embedding_size = z_size, num_classes, embedding_size
        self.chunk = z_size // (blocks + 1)
        self.widths = tuple(widths)
        self.embedding = nn.Embedding(num_classes, embedding_size)
        condition_size = self.chunk + embedding_size
        self.input = _maybe_sn(nn.Linear(condition_size, 4 * 4 * widths[0]), spectral_norm)
        self.blocks = nn.ModuleList(
            GeneratorBlock(widths[i], widths[i + 1], condition_size, spectral_norm) for i in range(blocks)
        )
        self.output_norm = nn.BatchNorm2d(widths[-1])
        self.output = _maybe_sn(nn.Conv2d(widths[-1], 3, 3, padding=1), spectral_norm)

    def class_embedding(self, condition: Tensor) -> Tensor:
        """Class ids (N,) become rows of the embedding table; float vectors (N, E) pass through unchanged."""
        if condition.dtype in (torch.int64, torch.int32):
            return self.embedding(condition.long())
        return condition

    def forward(self, z: Tensor, condition: Tensor) -> Tensor:
        embedding = self.class_embedding(condition)
        chunks = torch.split(z, self.chunk, dim=1)
        h = self.input(torch.cat([chunks[0], embedding], dim=1)).view(z.shape[0], self.widths[0], 4, 4)
        for block, chunk in zip(self.blocks, chunks[1:], strict=True):
            h = block(h, torch.cat([chunk, embedding], dim=1))
        return torch.tanh(self.output(F.relu(self.output_norm(h))))


class DiscriminatorBlock(nn.Module):
    """Residual down-sampling block (the first one skips the leading ReLU, as in SNGAN's optimized block)."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, first: bool, sn: bool) -> None:
        super().__init__()
        self.conv1 = _maybe_sn(nn.Conv2d(in_channels, out_channels, 3, padding=1), sn)
        self.conv2 = _maybe_sn(nn.Conv2d(out_channels, out_channels, 3, padding=1), sn)
        self.skip = _maybe_sn(nn.Conv2d(in_channels, out_channels, 1), sn)
        self.downsample, self.first = downsample, first

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        skip = self.skip(x)
        if self.downsample:
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return h + skip


@register_architecture("scenes_discriminator")
class ScenesDiscriminator(nn.Module):
    """Projection discriminator D(x, class) -> realism score (N,), higher is more real.

    The class may be ids (N,), class weights (N, num_classes) (for a continuous class vector), or None for the
    unconditional part alone.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, ...] = (64, 128, 128, 128),
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        channels = (3, *widths)
        self.blocks = nn.Sequential(
            *(
                DiscriminatorBlock(channels[i], channels[i + 1], i < len(widths) - 1, i == 0, spectral_norm)
                for i in range(len(widths))
            )
        )
        self.linear = _maybe_sn(nn.Linear(widths[-1], 1), spectral_norm)
        self.embedding = _maybe_sn(nn.Embedding(num_classes, widths[-1]), spectral_norm)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        score = self.linear(h).squeeze(1)
        if condition is None:
            return score
        if condition.dtype in (torch.int64, torch.int32):
            projection = self.embedding(condition.long())
        else:
            projection = condition @ self.embedding.weight
        return score + (projection * h).sum(dim=1)


class _ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


@register_architecture("scenes_classifier")
class ScenesClassifier(nn.Module):
    """A small VGG-like classifier; `features()` exposes each stage for feature-statistics losses and metrics.

    Stages `stage1`..`stage3` are the conv outputs at 32, 16 and 8 pixels (the three layers of the inversion
    criterion), `penultimate` the pooled vector before the last linear layer (the `*_builtin` metrics' space).
    """

    feature_names: tuple[str, ...] = ("stage1", "stage2", "stage3", "penultimate")

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128), feature_size: int = 128):
        super().__init__()
        self.stage1 = _ConvBlock(3, widths[0])
        self.stage2 = _ConvBlock(widths[0], widths[1])
        self.stage3 = _ConvBlock(widths[1], widths[2])
        self.head = nn.Sequential(nn.Linear(widths[2], feature_size), nn.ReLU())
        self.classifier = nn.Linear(feature_size, num_classes)

    def features(self, x: Tensor) -> dict[str, Tensor]:
        stage1 = self.stage1(x)
        stage2 = self.stage2(F.max_pool2d(stage1, 2))
        stage3 = self.stage3(F.max_pool2d(stage2, 2))
        penultimate = self.head(stage3.mean(dim=(2, 3)))
        return {"stage1": stage1, "stage2": stage2, "stage3": stage3, "penultimate": penultimate}

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x)["penultimate"])


class _ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.skip = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + self.skip(x))


@register_architecture("scenes_resnet")
class ScenesResNet(nn.Module):
    """A small ResNet: the judge's architecture, deliberately unlike `scenes_classifier`."""

    feature_names: tuple[str, ...] = ("stage1", "stage2", "stage3", "penultimate")

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (24, 48, 96)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        self.stage1 = _ResidualBlock(widths[0], widths[0], 1)
        self.stage2 = _ResidualBlock(widths[0], widths[1], 2)
        self.stage3 = _ResidualBlock(widths[1], widths[2], 2)
        self.classifier = nn.Linear(widths[2], num_classes)

    def features(self, x: Tensor) -> dict[str, Tensor]:
        stage1 = self.stage1(self.stem(x))
        stage2 = self.stage2(stage1)
        stage3 = self.stage3(stage2)
        return {"stage1": stage1, "stage2": stage2, "stage3": stage3, "penultimate": stage3.amax(dim=(2, 3))}

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x)["penultimate"])
