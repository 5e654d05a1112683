"""BigGAN-deep generators from checkpoint folders of the PyTorch port (huggingface's `pytorch-pretrained-biggan`).

A port folder holds `config.json` and `pytorch_model.bin` (a state dict). `register_biggan` turns one into a
registry version: the card is written from the config, the state dict is read with `torch.load(weights_only=True)`
(or from a `.safetensors` file of the same state dict) and stored as `.safetensors`, and nothing is downloaded.

Our own network, not the port's package: `pytorch_pretrained_biggan` (0.1.1, 2019) imports boto3 and requests at
import time for its download cache, pulling an AWS client into the server for a 300-line generator that gansteer
must never let download anything. So the network is written here, module for module, with the port's state-dict
keys, shapes and order (`tests/fixtures/biggan_128_state_dict.json` pins them) and its eval-mode arithmetic, so a
port checkpoint loads with `strict=True` and gives the same images. No dependency, no optional extra.

Two differences, neither visible in the weights file:
- the class table is an `nn.Embedding` named `embedding` (K, E), the table `ConditionalGenerator` reads and
  replaces; the port keeps it as a bias-free Linear `embeddings` (E, K) applied to a one-hot (which selects the same
  column exactly). State-dict hooks translate, so `state_dict()` is in the port's layout.
- spectral norm divides by sigma = u^T W v with the stored `weight_u`, `weight_v`, which is what torch's
  `spectral_norm` does in eval mode; power iteration never runs, so a tuned copy keeps its buffers.

Truncation: the port's forward takes `truncation`, which picks interpolated standing batch-norm statistics; here it
is the constructor's `truncation` (a card's `architecture_kwargs`), overridable per call. The card's latent prior is
N(0, truncation^2 I), so a request with truncation 2 draws z = truncation * TruncatedNormal(-2, 2), the port's
`truncated_noise_sample`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gansteer_server.models.architectures import register_architecture
from gansteer_server.models.errors import ModelRegistryError
from gansteer_server.models.loaders import check_state, read_safetensors, read_torch_state_dict

if TYPE_CHECKING:
    from gansteer_server.models.registry import ModelEntry, ModelRegistry

ARCHITECTURE = "biggan"
CONFIG_FILE = "config.json"
#: Weight files looked for in a port folder, in this order (the port's own name first).
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.safetensors")
#: The request truncation that, with the card's prior, samples z as the port's `truncated_noise_sample` does.
LATENT_TRUNCATION = 2.0
# The port's BigGANConfig defaults: the 128-pixel model. (up-sample?, in, out) channel multiples per block.
LAYERS_128 = (
    (False, 16, 16),
    (True, 16, 16),
    (False, 16, 16),
    (True, 16, 8),
    (False, 8, 8),
    (True, 8, 4),
    (False, 4, 4),
    (True, 4, 2),
    (False, 2, 2),
    (True, 2, 1),
)
PORT_CONFIG: dict[str, Any] = {
    "output_dim": 128,
    "z_dim": 128,
    "class_embed_dim": 128,
    "channel_width": 128,
    "num_classes": 1000,
    "layers": [list(layer) for layer in LAYERS_128],
    "attention_layer_position": 8,
    "eps": 1e-4,
    "n_stats": 51,
}
_PORT_EMBEDDING = "embeddings.weight"
_EMBEDDING = "embedding.weight"


def spectral_normalized(weight_orig: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """W / sigma with sigma = u^T W v from the stored singular vectors (Miyato et al. 2018, eq. 12)."""
    sigma = torch.dot(u, torch.mv(weight_orig.flatten(1), v))
    return weight_orig / sigma


class SpectralNormLinear(nn.Module):
    """A Linear under spectral norm, with the state dict of `nn.utils.spectral_norm(nn.Linear(...))`."""

    weight_u: Tensor
    weight_v: Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.weight_orig = nn.Parameter(_fresh_weight((out_features, in_features)))
        u, v = _singular_vectors(self.weight_orig)
        self.register_buffer("weight_u", u)
        self.register_buffer("weight_v", v)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, spectral_normalized(self.weight_orig, self.weight_u, self.weight_v), self.bias)


class SpectralNormConv2d(nn.Module):
    """A stride-1 Conv2d under spectral norm, with the state dict of `nn.utils.spectral_norm(nn.Conv2d(...))`."""

    weight_u: Tensor
    weight_v: Tensor

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, bias: bool = True
    ) -> None:
        super().__init__()
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_orig = nn.Parameter(_fresh_weight((out_channels, in_channels, kernel_size, kernel_size)))
        u, v = _singular_vectors(self.weight_orig)
        self.register_buffer("weight_u", u)
        self.register_buffer("weight_v", v)

    def forward(self, x: Tensor) -> Tensor:
        weight = spectral_normalized(self.weight_orig, self.weight_u, self.weight_v)
        return F.conv2d(x, weight, self.bias, padding=self.padding)


class SelfAttention(nn.Module):
    """SAGAN self-attention: keys and values max-pooled 2x, the output scaled by a learnt `gamma` (0 at start)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.snconv1x1_theta = SpectralNormConv2d(channels, channels // 8, 1, bias=False)
        self.snconv1x1_phi = SpectralNormConv2d(channels, channels // 8, 1, bias=False)
        self.snconv1x1_g = SpectralNormConv2d(channels, channels // 2, 1, bias=False)
        self.snconv1x1_o_conv = SpectralNormConv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        _, ch, h, w = x.shape
        theta = self.snconv1x1_theta(x).view(-1, ch // 8, h * w)
        phi = F.max_pool2d(self.snconv1x1_phi(x), 2, 2).view(-1, ch // 8, h * w // 4)
        attention = F.softmax(torch.bmm(theta.permute(0, 2, 1), phi), dim=-1)
        g = F.max_pool2d(self.snconv1x1_g(x), 2, 2).view(-1, ch // 2, h * w // 4)
        attended = torch.bmm(g, attention.permute(0, 2, 1)).view(-1, ch // 2, h, w)
        return x + self.gamma * self.snconv1x1_o_conv(attended)


class StandingBatchNorm(nn.Module):
    """Batch norm over standing statistics stored for `n_stats` truncations in [0, 1]; conditional (gain and bias
    linear in the condition vector) inside blocks, plain affine at the output."""

    running_means: Tensor
    running_vars: Tensor

    def __init__(self, num_features: int, condition_size: int | None, n_stats: int, eps: float) -> None:
        super().__init__()
        self.register_buffer("running_means", torch.zeros(n_stats, num_features))
        self.register_buffer("running_vars", torch.ones(n_stats, num_features))
        self.step_size = 1.0 / (n_stats - 1)
        self.eps = eps
        self.conditional = condition_size is not None
        if condition_size is not None:
            self.scale = SpectralNormLinear(condition_size, num_features, bias=False)
            self.offset = SpectralNormLinear(condition_size, num_features, bias=False)
        else:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def statistics(self, truncation: float) -> tuple[Tensor, Tensor]:
        """Mean and variance for `truncation`, blended between the two nearest stored entries exactly as the port
        blends them (its weights: the fractional part on the lower entry)."""
        coef, start = math.modf(truncation / self.step_size)
        index = int(start)
        if coef == 0.0:
            return self.running_means[index], self.running_vars[index]
        mean = self.running_means[index] * coef + self.running_means[index + 1] * (1 - coef)
        var = self.running_vars[index] * coef + self.running_vars[index + 1] * (1 - coef)
        return mean, var

    def forward(self, x: Tensor, truncation: float, condition: Tensor | None = None) -> Tensor:
        mean, var = self.statistics(truncation)
        if not self.conditional:
            return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, momentum=0.0, eps=self.eps)
        assert condition is not None
        mean, var = mean[None, :, None, None], var[None, :, None, None]
        gain = 1 + self.scale(condition)[:, :, None, None]
        bias = self.offset(condition)[:, :, None, None]
        return (x - mean) / torch.sqrt(var + self.eps) * gain + bias


class GeneratorBlock(nn.Module):
    """BigGAN-deep residual block: 1x1 down to a quarter of the channels, two 3x3, 1x1 up, each after a
    conditional batch norm and ReLU; the skip drops channels and up-samples to match."""

    def __init__(
        self, in_size: int, out_size: int, condition_size: int, up_sample: bool, n_stats: int, eps: float
    ) -> None:
        super().__init__()
        self.up_sample = up_sample
        self.drop_channels = in_size != out_size
        middle = in_size // 4
        self.bn_0 = StandingBatchNorm(in_size, condition_size, n_stats, eps)
        self.conv_0 = SpectralNormConv2d(in_size, middle, 1)
        self.bn_1 = StandingBatchNorm(middle, condition_size, n_stats, eps)
        self.conv_1 = SpectralNormConv2d(middle, middle, 3, padding=1)
        self.bn_2 = StandingBatchNorm(middle, condition_size, n_stats, eps)
        self.conv_2 = SpectralNormConv2d(middle, middle, 3, padding=1)
        self.bn_3 = StandingBatchNorm(middle, condition_size, n_stats, eps)
        self.conv_3 = SpectralNormConv2d(middle, out_size, 1)

    def forward(self, x: Tensor, condition: Tensor, truncation: float) -> Tensor:
        h = self.conv_0(F.relu(self.bn_0(x, truncation, condition)))
        h = F.relu(self.bn_1(h, truncation, condition))
        if self.up_sample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.conv_1(h)
        h = self.conv_2(F.relu(self.bn_2(h, truncation, condition)))
        h = self.conv_3(F.relu(self.bn_3(h, truncation, condition)))
        if self.drop_channels:
            x = x[:, : x.shape[1] // 2, ...]
        if self.up_sample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return h + x


class Generator(nn.Module):
    """The port's `Generator`: condition (z, class embedding) -> 4x4 grid -> blocks (attention at one position)
    -> batch norm, ReLU, conv, first three channels, tanh."""

    def __init__(
        self,
        z_dim: int,
        channel_width: int,
        layers: Sequence[Sequence[Any]],
        attention_layer_position: int,
        eps: float,
        n_stats: int,
    ) -> None:
        super().__init__()
        self.channel_width = channel_width
        condition_size = 2 * z_dim
        self.gen_z = SpectralNormLinear(condition_size, 4 * 4 * 16 * channel_width)
        blocks: list[nn.Module] = []
        for i, (up_sample, in_mult, out_mult) in enumerate(layers):
            if i == attention_layer_position:
                blocks.append(SelfAttention(channel_width * in_mult))
            blocks.append(
                GeneratorBlock(
                    channel_width * in_mult, channel_width * out_mult, condition_size, bool(up_sample), n_stats, eps
                )
            )
        self.layers = nn.ModuleList(blocks)
        self.bn = StandingBatchNorm(channel_width, None, n_stats, eps)
        self.conv_to_rgb = SpectralNormConv2d(channel_width, channel_width, 3, padding=1)

    def forward(self, condition: Tensor, truncation: float) -> Tensor:
        # The weights come from TensorFlow: the first layer's output is laid out height, width, channels.
        h = self.gen_z(condition).view(-1, 4, 4, 16 * self.channel_width).permute(0, 3, 1, 2).contiguous()
        for layer in self.layers:
            h = layer(h, condition, truncation) if isinstance(layer, GeneratorBlock) else layer(h)
        h = self.conv_to_rgb(F.relu(self.bn(h, truncation)))
        return torch.tanh(h[:, :3, ...])


@register_architecture(ARCHITECTURE)
class BigGAN(nn.Module):
    """G(z, class) -> images in [-1, 1]; the keyword arguments are the port's `config.json` plus `truncation`.

    A class is ids (N,) looked up in `embedding`, or free embedding vectors (N, z_dim) used as they are.
    """

    def __init__(
        self,
        output_dim: int = 128,
        z_dim: int = 128,
        class_embed_dim: int = 128,
        channel_width: int = 128,
        num_classes: int = 1000,
        layers: Sequence[Sequence[Any]] = LAYERS_128,
        attention_layer_position: int = 8,
        eps: float = 1e-4,
        n_stats: int = 51,
        truncation: float = 0.4,
    ) -> None:
        super().__init__()
        _check_config(output_dim, z_dim, class_embed_dim, layers, attention_layer_position, n_stats, truncation)
        self.z_dim, self.num_classes, self.resolution = z_dim, num_classes, output_dim
        self.truncation = float(truncation)
        self.embedding = nn.Embedding(num_classes, z_dim)
        self.generator = Generator(z_dim, channel_width, layers, attention_layer_position, eps, n_stats)
        self.register_state_dict_post_hook(_to_port_layout)
        self.register_load_state_dict_pre_hook(_from_port_layout)

    def class_embedding(self, condition: Tensor) -> Tensor:
        """Class ids (N,) become rows of the embedding table; float vectors (N, E) pass through unchanged."""
        if condition.dtype in (torch.int64, torch.int32):
            return self.embedding(condition.long())
        return condition

    def forward(self, z: Tensor, condition: Tensor, truncation: float | None = None) -> Tensor:
        truncation = self.truncation if truncation is None else truncation
        if not 0 < truncation <= 1:
            raise ValueError(f"truncation must lie in (0, 1], got {truncation}")
        return self.generator(torch.cat([z, self.class_embedding(condition)], dim=1), truncation)


def output_resolution(layers: Sequence[Sequence[Any]]) -> int:
    """4 pixels, doubled by every up-sampling block."""
    return 4 * 2 ** sum(bool(layer[0]) for layer in layers)


def read_port_config(path: Path) -> dict[str, Any]:
    """The port's `config.json` as BigGAN keyword arguments (missing keys take the port's 128-pixel defaults, as
    `BigGANConfig.from_dict` does); errors name the file and the key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelRegistryError(
            f"missing: a pytorch-pretrained-biggan folder holds {CONFIG_FILE} beside its weights",
            path=path,
            field=CONFIG_FILE,
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelRegistryError(f"not valid JSON ({error})", path=path, field=CONFIG_FILE) from None
    if not isinstance(data, dict):
        raise ModelRegistryError(f"expected a JSON object, got {type(data).__name__}", path=path, field=CONFIG_FILE)
    unknown = sorted(set(data) - set(PORT_CONFIG))
    if unknown:
        raise ModelRegistryError(
            f"unknown key(s) {unknown} (a BigGANConfig has: {', '.join(PORT_CONFIG)})", path=path, field=unknown[0]
        )
    config = {**PORT_CONFIG, **data}
    for key in ("output_dim", "z_dim", "class_embed_dim", "channel_width", "num_classes", "n_stats"):
        if not _is_int(config[key]) or config[key] < 1:
            raise ModelRegistryError(f"expected a positive integer, got {config[key]!r}", path=path, field=key)
    if not _is_int(config["attention_layer_position"]):
        raise ModelRegistryError(
            f"expected an integer, got {config['attention_layer_position']!r}",
            path=path,
            field="attention_layer_position",
        )
    if not isinstance(config["eps"], (int, float)) or isinstance(config["eps"], bool) or not config["eps"] > 0:
        raise ModelRegistryError(f"expected a positive number, got {config['eps']!r}", path=path, field="eps")
    layers = config["layers"]
    if not isinstance(layers, list) or not layers or not all(_is_layer(layer) for layer in layers):
        raise ModelRegistryError(
            "expected a non-empty list of [up_sample (bool), in (int), out (int)]", path=path, field="layers"
        )
    return config


def register_biggan(
    registry: ModelRegistry,
    name: str,
    folder: Path | str,
    *,
    truncation: float = 0.4,
    weights: str | None = None,
    class_names: Sequence[str] | None = None,
    description: str = "",
    version: int | None = None,
) -> ModelEntry:
    """Register a port checkpoint folder as a version of `name` and return it.

    `weights` names the state-dict file in `folder` (default: the first of `WEIGHT_FILES` present). A `.bin`/`.pt`
    file is read with `torch.load(weights_only=True)`, which refuses any pickled object that is not a tensor; its
    keys and shapes are checked against the config before anything is written.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    kwargs = {**read_port_config(config_path), "truncation": truncation}
    try:
        with torch.device("meta"):  # shapes only: checking a 50M-parameter layout costs nothing
            model = BigGAN(**kwargs)
    except ValueError as error:
        field = "truncation" if "truncation" in str(error) else CONFIG_FILE
        raise ModelRegistryError(str(error), path=config_path, field=field) from None
    path = _weights_path(folder, weights)
    state = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_state_dict(path)
    check_state(model, state, path, ARCHITECTURE)
    stored: Path | bytes = path if path.suffix == ".safetensors" else _safetensors_bytes(state)
    prior = safetensors.torch.save(
        {"mean": torch.zeros(model.z_dim), "covariance": torch.eye(model.z_dim) * float(truncation) ** 2}
    )
    card: dict[str, Any] = {
        "kind": "generator",
        "format": "safetensors",
        "architecture": ARCHITECTURE,
        "architecture_kwargs": kwargs,
        "weights": "weights.safetensors",
        "latent_size": model.z_dim,
        "latent_prior": {"type": "gaussian", "mean_cov": "prior.safetensors"},
        "num_classes": model.num_classes,
        "embedding_size": model.z_dim,
        "resolution": model.resolution,
        "value_range": [-1, 1],
        "description": description
        or f"BigGAN-deep {model.resolution}px from a pytorch-pretrained-biggan checkpoint, truncation {truncation}",
        "extra": {"source": "pytorch-pretrained-biggan", "latent_truncation": LATENT_TRUNCATION},
    }
    if class_names is not None:
        card["class_names"] = list(class_names)
    files = {"weights.safetensors": stored, "prior.safetensors": prior, CONFIG_FILE: config_path}
    return registry.register(name, card, files, version=version)


def _check_config(
    output_dim: int,
    z_dim: int,
    class_embed_dim: int,
    layers: Sequence[Sequence[Any]],
    attention_layer_position: int,
    n_stats: int,
    truncation: float,
) -> None:
    if class_embed_dim != z_dim:
        raise ValueError(f"class_embed_dim {class_embed_dim} != z_dim {z_dim} (the port sizes the table by z_dim)")
    if not 0 < truncation <= 1:
        raise ValueError(f"truncation must lie in (0, 1], got {truncation}")
    if n_stats < 2:
        raise ValueError(f"n_stats must be at least 2, got {n_stats}")
    if layers[0][1] != 16 or layers[-1][2] != 1:
        raise ValueError("layers must start at 16 and end at 1 channel multiple (the port's input and output widths)")
    for i, (_, in_mult, out_mult) in enumerate(layers):
        if out_mult not in (in_mult, in_mult / 2):
            raise ValueError(f"layer {i} goes from {in_mult} to {out_mult}: a block keeps or halves its channels")
        if i and in_mult != layers[i - 1][2]:
            raise ValueError(
                f"layer {i} takes {layers[i][1]} channel multiples but layer {i - 1} gives {layers[i - 1][2]}"
            )
    if not 0 <= attention_layer_position < len(layers):
        raise ValueError(f"attention_layer_position {attention_layer_position} is outside the {len(layers)} layers")
    if output_resolution(layers) != output_dim:
        raise ValueError(f"the layers up-sample to {output_resolution(layers)} pixels, but output_dim is {output_dim}")


def _to_port_layout(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict(): the class table as the port's `embeddings` Linear weight (E, K), in the same place."""
    items = [
        (prefix + _PORT_EMBEDDING, value.t().contiguous()) if key == prefix + _EMBEDDING else (key, value)
        for key, value in state.items()
    ]
    state.clear()
    state.update(items)


def _from_port_layout(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """load_state_dict(): the port's `embeddings` weight (E, K) into the `embedding` table (K, E)."""
    if prefix + _PORT_EMBEDDING in state:
        state[prefix + _EMBEDDING] = state.pop(prefix + _PORT_EMBEDDING).t()


def _fresh_weight(shape: tuple[int, ...]) -> Tensor:
    """torch's default Linear/Conv2d initialisation (the real weights come from a checkpoint)."""
    weight = torch.empty(shape)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


def _singular_vectors(weight: Tensor, steps: int = 3) -> tuple[Tensor, Tensor]:
    """Leading singular vectors (u, v) by power iteration, so a fresh module's sigma is about its spectral norm."""
    matrix = weight.detach().flatten(1)
    if matrix.is_meta:  # shapes only (a layout check): skip the arithmetic, slow on the meta device
        return matrix.new_empty(matrix.shape[0]), matrix.new_empty(matrix.shape[1])
    v = torch.randn(matrix.shape[1], device=matrix.device)
    u = matrix @ v
    for _ in range(steps):
        u = u / u.norm()
        v = matrix.t() @ u
        v = v / v.norm()
        u = matrix @ v
    return u / u.norm(), v


def _weights_path(folder: Path, weights: str | None) -> Path:
    if weights is not None:
        return folder / weights
    for candidate in WEIGHT_FILES:
        if (folder / candidate).is_file():
            return folder / candidate
    raise ModelRegistryError(
        f"no weights file: expected one of {', '.join(WEIGHT_FILES)} (or name it with weights=...)",
        path=folder,
        field="weights",
    )


def _safetensors_bytes(state: Mapping[str, Tensor]) -> bytes:
    return safetensors.torch.save({key: value.contiguous() for key, value in state.items()})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_layer(layer: Any) -> bool:
    return (
        isinstance(layer, list)
        and len(layer) == 3
        and isinstance(layer[0], bool)
        and all(_is_int(n) and n > 0 for n in layer[1:])
    )
