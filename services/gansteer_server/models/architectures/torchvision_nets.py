"""torchvision-compatible classifiers (AlexNet, VGG16/19, ResNet18/50, Inception v3) for users' weight files.

torchvision itself cannot be imported beside the project's CPU torch build, so these are plain `torch.nn` copies of
torchvision 0.28/0.29's `alexnet`, `vgg16`, `vgg19`, `resnet18`, `resnet50` (and, in `torchvision_inception`,
`inception_v3`): same module names, state_dict keys and shapes and eval-mode forward, so torchvision's published
`.pth` state dicts (or their `.safetensors` conversions) load with `strict=True` and give the same outputs.

gansteer also uses these classifiers as feature extractors: `intermediate_features(model, x, layers)` returns
activations by name (VGG "relu3_1", ResNet "layer2", Inception "Mixed_6e", ...; see `feature_layer_names`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gansteer_server.models.architectures import register_architecture
from gansteer_server.models.architectures.torchvision_inception import Inception3, Stage, inception_v3

__all__ = [
    "VGG",
    "AlexNet",
    "BasicBlock",
    "Bottleneck",
    "Inception3",
    "ResNet",
    "alexnet",
    "feature_layer_names",
    "inception_v3",
    "intermediate_features",
    "resnet18",
    "resnet50",
    "vgg16",
    "vgg19",
]


@runtime_checkable
class StagedNet(Protocol):
    """A network whose forward pass is exposed as named steps; each step maps the previous step's output onward."""

    default_feature_layers: tuple[str, ...]

    def named_stages(self) -> list[Stage]: ...


def feature_layer_names(model: nn.Module) -> list[str]:
    """Names `intermediate_features` accepts for this model, in forward order."""
    return [name for name, _ in _stages(model)]


def intermediate_features(model: nn.Module, x: Tensor, layers: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Run `model` on `x` as far as needed and return the named activations (in the order of `layers`).

    `layers` defaults to the model's `default_feature_layers`. The pass stops after the last requested layer, and
    gradients flow as in `model(x)`, so the result can serve as an inversion or perceptual criterion. ReLUs are applied
    out of place here, so no returned tensor is overwritten by a later in-place op.
    """
    stages = _stages(model)
    wanted = list(layers) if layers is not None else list(model.default_feature_layers)  # type: ignore[union-attr]
    known = {name for name, _ in stages}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise KeyError(f"unknown feature layer(s) {unknown} for {type(model).__name__}; known: {sorted(known)}")
    remaining = set(wanted)
    found: dict[str, Tensor] = {}
    for name, stage in stages:
        if not remaining:
            break
        x = stage(x)
        if name in remaining:
            found[name] = x
            remaining.discard(name)
    return {name: found[name] for name in wanted}


def _stages(model: nn.Module) -> list[Stage]:
    if not isinstance(model, StagedNet):
        raise TypeError(f"{type(model).__name__} does not expose named stages")
    return model.named_stages()


def _relu(x: Tensor) -> Tensor:
    return F.relu(x)


def _sequential_stages(seq: nn.Sequential, names: list[str]) -> list[Stage]:
    """Pair a Sequential's children with names; ReLUs become out-of-place so stored activations stay intact."""
    return [(name, _relu if isinstance(m, nn.ReLU) else m) for name, m in zip(names, seq, strict=True)]


def _flatten_after(pool: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda x: torch.flatten(pool(x), 1)


class AlexNet(nn.Module):
    """torchvision's AlexNet (the "one weird trick" variant: 64-192-384-256-256 channels)."""

    default_feature_layers: tuple[str, ...] = ("relu1", "relu2", "relu3", "relu4", "relu5")

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    def named_stages(self) -> list[Stage]:
        """conv1..conv5 / relu1..relu5 / pool1, pool2, pool5, then "avgpool" (flattened), fc6.., "logits"."""
        names: list[str] = []
        n = 0
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                n += 1
                names.append(f"conv{n}")
            else:
                names.append(f"{'relu' if isinstance(m, nn.ReLU) else 'pool'}{n}")
        head = ["drop6", "fc6", "relu6", "drop7", "fc7", "relu7", "logits"]
        return [
            *_sequential_stages(self.features, names),
            ("avgpool", _flatten_after(self.avgpool)),
            *_sequential_stages(self.classifier, head),
        ]


VGG_CONFIGS: dict[str, list[int | str]] = {
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_vgg_layers(cfg: list[int | str]) -> nn.Sequential:
    """torchvision's `make_layers` without batch norm: 3x3 convs and ReLUs, "M" is a 2x2 max pool."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """torchvision's VGG (`features` / `avgpool` / `classifier`), non-BN variants.

    Feature names follow the usual VGG convention: conv{block}_{i}, relu{block}_{i}, pool{block}. The default
    feature layers are the first ReLU after pools 2, 3 and 4 (relu3_1, relu4_1, relu5_1), the inversion criterion
    gansteer's source document uses.
    """

    default_feature_layers: tuple[str, ...] = ("relu3_1", "relu4_1", "relu5_1")

    def __init__(
        self, features: nn.Sequential, num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    def named_stages(self) -> list[Stage]:
        names: list[str] = []
        block, index = 1, 0
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                index += 1
                names.append(f"conv{block}_{index}")
            elif isinstance(m, nn.ReLU):
                names.append(f"relu{block}_{index}")
            else:
                names.append(f"pool{block}")
                block, index = block + 1, 0
        head = ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "logits"]
        return [
            *_sequential_stages(self.features, names),
            ("avgpool", _flatten_after(self.avgpool)),
            *_sequential_stages(self.classifier, head),
        ]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's two-3x3-conv residual block (ResNet18/34)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's bottleneck block (ResNet V1.5: the stride sits on the 3x3 conv, not the first 1x1)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet (`conv1`, `bn1`, `layer1..4`, `fc`); feature names are the module names."""

    default_feature_layers: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def named_stages(self) -> list[Stage]:
        """Stem ("conv1", after BN and ReLU), "maxpool", layer1..layer4, "avgpool" (flattened), "logits"."""
        return [
            ("conv1", lambda x: F.relu(self.bn1(self.conv1(x)))),
            ("maxpool", self.maxpool),
            ("layer1", self.layer1),
            ("layer2", self.layer2),
            ("layer3", self.layer3),
            ("layer4", self.layer4),
            ("avgpool", _flatten_after(self.avgpool)),
            ("logits", self.fc),
        ]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_architecture("torchvision_alexnet")
def alexnet(num_classes: int = 1000, dropout: float = 0.5) -> AlexNet:
    return AlexNet(num_classes=num_classes, dropout=dropout)


@register_architecture("torchvision_vgg16")
def vgg16(num_classes: int = 1000, dropout: float = 0.5) -> VGG:
    return VGG(make_vgg_layers(VGG_CONFIGS["D"]), num_classes=num_classes, dropout=dropout)


@register_architecture("torchvision_vgg19")
def vgg19(num_classes: int = 1000, dropout: float = 0.5) -> VGG:
    return VGG(make_vgg_layers(VGG_CONFIGS["E"]), num_classes=num_classes, dropout=dropout)


@register_architecture("torchvision_resnet18")
def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


@register_architecture("torchvision_resnet50")
def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
