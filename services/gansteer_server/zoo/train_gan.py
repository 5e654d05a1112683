"""Train `scenes-gen` and `scenes-disc`: hinge loss, projection discriminator, spectral norm, EMA weights,
two learning rates and a mode-seeking term, resumable from checkpoints.

What matters for coverage at this budget (see docs/zoo.md for the figures): a narrow generator trained for many
steps rather than a wide one for few, the discriminator learning four times faster than the generator, z reaching
every block, and MSGAN's mode-seeking term, which keeps two latents of one class from giving one image.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gansteer_server.data.scenes import render_scenes
from gansteer_server.models.architectures.scenes import ScenesDiscriminator, ScenesGenerator


@dataclass(frozen=True)
class GanTrainingConfig:
    generator_widths: tuple[int, ...] = (128, 64, 32, 16)
    discriminator_widths: tuple[int, ...] = (32, 64, 128, 128)
    batch_size: int = 64
    generator_lr: float = 1e-4
    discriminator_lr: float = 4e-4
    betas: tuple[float, float] = (0.0, 0.999)
    mode_seeking_weight: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 1000
    train_images: int = 150_000
    data_seed: int = 100
    seed: int = 0
    steps: int = 18_000
    # The last stretch runs at a fifth of both learning rates, which settles the weights the EMA averages.
    decay_from_step: int = 15_000
    lr_decay: float = 0.2
    # A resumed stage starts fresh Adam moments; ramping its learning rates up over these steps avoids a jolt.
    warmup_steps: int = 0
    checkpoint_every: int = 500
    # Full checkpoints kept beside the rolling one: the weaker generators shipped as `scenes-gen-step<N>`.
    snapshot_steps: tuple[int, ...] = (300, 900, 1500, 1800)


# The second stage: the first stage's last phase (a fifth of both learning rates) extended from its final weights,
# on freshly rendered scenes; the EMA carries on from the first stage's average.
POLISH = GanTrainingConfig(
    generator_lr=2e-5,
    discriminator_lr=8e-5,
    ema_start=0,
    data_seed=101,
    seed=1,
    steps=4_000,
    decay_from_step=4_000,
    warmup_steps=100,
    snapshot_steps=(),
)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def mode_seeking_loss(
    generator: ScenesGenerator, z: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate with pairs of latents sharing a class; return the images and MSGAN's 1 / (d_image / d_z) term."""
    half = z.shape[0] // 2
    labels = torch.cat([labels[:half], labels[:half]])
    images = generator(z, labels)
    image_distance = (images[:half] - images[half:]).abs().mean(dim=(1, 2, 3))
    latent_distance = (z[:half] - z[half:]).abs().mean(dim=1)
    return images, labels, 1.0 / (image_distance / latent_distance + 1e-5)


def initial_weights(
    checkpoint: Path | None, generator_ref: str | None, discriminator_ref: str | None
) -> dict[str, dict[str, torch.Tensor]]:
    """Starting weights for a resumed stage: the generator (also the EMA's start) and discriminator of an earlier
    stage's checkpoint, or registered models (spectral norm folded) with spectral norm put back on, so that a
    machine without the earlier stage's checkpoints can resume from the shipped zoo."""
    if checkpoint is not None:
        state = torch.load(checkpoint, weights_only=True)
        return {"generator": state["ema"], "discriminator": state["discriminator"]}
    if generator_ref is None or discriminator_ref is None:
        raise ValueError("resume from a checkpoint or from both a registered generator and discriminator")
    from gansteer_server.config import BUILTIN_REGISTRY
    from gansteer_server.models import ModelRegistry

    registry = ModelRegistry([BUILTIN_REGISTRY])
    weights = {}
    for key, ref in (("generator", generator_ref), ("discriminator", discriminator_ref)):
        module = registry.load(ref)
        for child in module.modules():
            # The architectures put spectral norm on every conv and linear layer, and on D's projection embedding.
            if isinstance(child, torch.nn.Conv2d | torch.nn.Linear) or (
                key == "discriminator" and isinstance(child, torch.nn.Embedding)
            ):
                torch.nn.utils.parametrizations.spectral_norm(child)
        weights[key] = module.state_dict()
    return weights


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
        ema_buffer.copy_(buffer)


def train(
    config: GanTrainingConfig,
    work_dir: Path,
    minutes: float | None,
    init: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Train until `config.steps` or the time budget; resumes from `work_dir/checkpoint.pt` when present, else
    starts from `init` (see `initial_weights`) or from scratch."""
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    generator = ScenesGenerator(widths=config.generator_widths)
    discriminator = ScenesDiscriminator(widths=config.discriminator_widths)
    ema = copy.deepcopy(generator).eval()
    g_opt = torch.optim.Adam(generator.parameters(), config.generator_lr, betas=config.betas)
    d_opt = torch.optim.Adam(discriminator.parameters(), config.discriminator_lr, betas=config.betas)
    checkpoint_path = work_dir / "checkpoint.pt"
    step = 0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=True)
        for module, key in ((generator, "generator"), (discriminator, "discriminator"), (ema, "ema")):
            module.load_state_dict(state[key])
        g_opt.load_state_dict(state["g_opt"])
        d_opt.load_state_dict(state["d_opt"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"])
        print(f"resumed at step {step}", flush=True)
    elif init is not None:
        for module in (generator, ema):
            module.load_state_dict(init["generator"])
        discriminator.load_state_dict(init["discriminator"])
        print("started from earlier weights", flush=True)
    # NHWC convolutions are about a quarter faster on CPU; the state dicts are unchanged.
    for module in (generator, discriminator, ema):
        module.to(memory_format=torch.channels_last)
    if step >= config.steps or minutes == 0:
        return checkpoint_path
    print(f"rendering {config.train_images} training scenes", flush=True)
    data = render_scenes(config.train_images, seed=config.data_seed)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    started, deadline = time.time(), None if minutes is None else time.time() + minutes * 60
    last_log = step
    while step < config.steps and (deadline is None or time.time() < deadline):
        scale = config.lr_decay if step >= config.decay_from_step else 1.0
        scale *= min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        for optimizer, lr in ((g_opt, config.generator_lr), (d_opt, config.discriminator_lr)):
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
        index = torch.randint(0, images.shape[0], (config.batch_size,))
        real, real_labels = (
            _to_tensor(images[index].numpy()).contiguous(memory_format=torch.channels_last),
            labels[index],
        )
        fake_labels = torch.randint(0, generator.num_classes, (config.batch_size,))
        with torch.no_grad():
            fake = generator(torch.randn(config.batch_size, generator.z_size), fake_labels)
        d_loss = (
            F.relu(1 - discriminator(real, real_labels)).mean() + F.relu(1 + discriminator(fake, fake_labels)).mean()
        )
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()

        z = torch.randn(config.batch_size, generator.z_size)
        fake, fake_labels, ms = mode_seeking_loss(generator, z, fake_labels)
        g_loss = -discriminator(fake, fake_labels).mean()
        g_opt.zero_grad(set_to_none=True)
        (g_loss + config.mode_seeking_weight * ms.mean()).backward()
        g_opt.step()
        step += 1
        update_ema(ema, generator, 0.0 if step < config.ema_start else config.ema_decay)
        if step % 100 == 0:
            rate = (step - last_log) / max(time.time() - started, 1e-6)
            print(
                f"step {step} d_loss {d_loss.item():.3f} g_loss {g_loss.item():.3f} "
                f"mode_seeking {ms.mean().item():.3f} {rate:.2f} it/s",
                flush=True,
            )
        if step % config.checkpoint_every == 0 or step == config.steps or step in config.snapshot_steps:
            state = {
                "generator": generator.state_dict(),
                "discriminator": discriminator.state_dict(),
                "ema": ema.state_dict(),
                "g_opt": g_opt.state_dict(),
                "d_opt": d_opt.state_dict(),
                "step": step,
                "rng": torch.get_rng_state(),
                "config": str(asdict(config)),
            }
            torch.save(state, work_dir / "checkpoint.tmp")
            (work_dir / "checkpoint.tmp").replace(checkpoint_path)
            if step in config.snapshot_steps:
                torch.save(state, snapshot_path(work_dir, step))
    print(f"stopped at step {step}", flush=True)
    return checkpoint_path


def snapshot_path(work_dir: Path, step: int) -> Path:
    return work_dir / f"snapshot-{step:05d}.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path("zoo-work/gan"))
    parser.add_argument("--minutes", type=float, default=None, help="stop after this wall time (resume later)")
    parser.add_argument("--steps", type=int, default=None, help="override the stage's number of steps")
    parser.add_argument("--threads", type=int, default=1, help="1 beside other work (see docs/zoo_training.md)")
    parser.add_argument("--polish", action="store_true", help="the second stage (POLISH), resuming as below")
    parser.add_argument("--from-checkpoint", type=Path, default=None, help="the first stage's checkpoint.pt")
    parser.add_argument("--from-registry", nargs=2, metavar=("GENERATOR", "DISCRIMINATOR"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.polish:
        train(
            dataclasses.replace(GanTrainingConfig(), steps=args.steps or GanTrainingConfig.steps),
            args.work_dir,
            args.minutes,
        )
        return
    init = None
    if not (args.work_dir / "checkpoint.pt").exists():
        refs = args.from_registry or (None, None)
        init = initial_weights(args.from_checkpoint, *refs)
    train(dataclasses.replace(POLISH, steps=args.steps or POLISH.steps), args.work_dir, args.minutes, init)


if __name__ == "__main__":
    main()
