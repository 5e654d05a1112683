"""Tuning a generator against a frozen PIR estimator (seed 000, section 2.4), with guards against reward hacking.

The generator keeps its GAN training against its discriminator on real images and gains the estimator's expected
rate: minimise L_G - w_PIR * E_z,c[R(G(z, c))] (the seed maximises L_fake-fools + w_PIR * L_PIR), with the
discriminator trained alongside on real and generated images (hinge losses, as the built-in zoo was trained).

Guards (the shared notes on ReFL, DDPO and DPOK: a learned reward is hacked unless the tuning is held back):
- anchor: + w_anchor * mean |G(z, c) - G0(z, c)|^2, a distance to the frozen generator's image of the same latent
  (pixels, or a feature space when `anchor_features` is given);
- early stop: every `check_every` steps a second estimator, trained on a disjoint half of the interactions, scores
  a fixed probe batch; the weights it rates highest are kept, and after `patience` checks without a new best the
  run stops and returns them. When the first estimator's rate climbs while the second's does not, the tuning is
  exploiting the first estimator's errors rather than the interactions both were trained on.

The generator runs in eval mode (batch-norm statistics stay as trained) so the tuned module is exactly what is served.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gansteer_server.algorithms.pir.estimator import expected_rate


@dataclass(frozen=True)
class TuningConfig:
    pir_weight: float = 1000.0  # w_PIR (section 2.4)
    learning_rate: float = 1e-6  # the seed's; the built-in generator needs far more (see docs/pir.md)
    discriminator_learning_rate: float = 0.0  # 0: 4 x learning_rate, the zoo's ratio
    steps: int = 50_000
    batch_size: int = 32
    temperature: float = 0.01  # the estimator's softmax temperature at use (C.3)
    anchor_weight: float = 0.0  # 0: no anchor
    check_every: int = 0  # 0: no early stopping
    patience: int = 2
    min_delta: float = 0.0
    check_images: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pir_weight < 0:
            raise ValueError(f"pir_weight must be >= 0, got {self.pir_weight}")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")


@dataclass(frozen=True)
class TuningModels:
    generator: nn.Module  # trainable copy, G(z, class ids) -> images in [-1, 1]
    frozen: nn.Module  # the generator as published, for the anchor
    discriminator: nn.Module  # trainable copy, D(images, class ids) -> realism
    estimator: nn.Module  # frozen, images -> logits over bins
    real_images: Tensor  # (M, 3, H, W) in [-1, 1]
    real_labels: Tensor  # (M,) class ids
    latent_size: int
    num_classes: int
    check_estimator: nn.Module | None = None  # frozen, trained on the disjoint half
    anchor_features: Callable[[Tensor], Tensor] | None = None


class PIRTuning:
    """The tuning loop one step at a time; `state_dict()` resumes it exactly (latents come from seeded streams)."""

    def __init__(self, models: TuningModels, config: TuningConfig) -> None:
        if config.check_every and models.check_estimator is None:
            raise ValueError("early stopping needs a check estimator trained on the other half")
        self.models, self.config = models, config
        models.generator.eval()
        models.discriminator.train()
        d_lr = config.discriminator_learning_rate or 4 * config.learning_rate
        self.g_opt = torch.optim.Adam(models.generator.parameters(), config.learning_rate, betas=(0.0, 0.999))
        self.d_opt = torch.optim.Adam(models.discriminator.parameters(), d_lr, betas=(0.0, 0.999))
        probe = torch.Generator().manual_seed(config.seed * 7919 + 1)
        self.probe_z = torch.randn(config.check_images, models.latent_size, generator=probe)
        self.probe_c = torch.randint(models.num_classes, (config.check_images,), generator=probe)
        self.step_count = 0
        self.stopped_early = False
        self.best_check = -float("inf")
        self.best_step = 0
        self.stale = 0
        self.best_state: dict[str, Tensor] | None = None
        self.checks: list[dict[str, float]] = []
        self.last: dict[str, float] = {}

    @property
    def done(self) -> bool:
        return self.stopped_early or self.step_count >= self.config.steps

    def _batch(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step_count)
        size = self.config.batch_size
        z = torch.randn(size, self.models.latent_size, generator=generator)
        c = torch.randint(self.models.num_classes, (size,), generator=generator)
        index = torch.randint(len(self.models.real_images), (size,), generator=generator)
        return z, c, self.models.real_images[index], self.models.real_labels[index]

    def _anchor(self, images: Tensor, z: Tensor, c: Tensor) -> Tensor:
        with torch.no_grad():
            reference = self.models.frozen(z, c)
        features = self.models.anchor_features
        if features is None:
            return (images - reference).square().flatten(1).mean(1).mean()
        return (features(images) - features(reference)).square().flatten(1).mean(1).mean()

    def step(self) -> dict[str, float]:
        """One discriminator and one generator update; a check of the estimators every `check_every` steps."""
        models, config = self.models, self.config
        z, c, real, labels = self._batch()
        fake = models.generator(z, c)
        d_loss = F.relu(1 - models.discriminator(real, labels)).mean()
        d_loss = d_loss + F.relu(1 + models.discriminator(fake.detach(), c)).mean()
        self.d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_opt.step()

        gan = -models.discriminator(fake, c).mean()
        pir = expected_rate(models.estimator(fake), config.temperature).mean()
        loss = gan - config.pir_weight * pir
        anchor = torch.zeros(())
        if config.anchor_weight > 0:
            anchor = self._anchor(fake, z, c)
            loss = loss + config.anchor_weight * anchor
        self.g_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.g_opt.step()
        models.discriminator.zero_grad(set_to_none=True)
        self.step_count += 1
        self.last = {
            "gan_loss": float(gan.detach()),
            "discriminator_loss": float(d_loss.detach()),
            "estimated_pir": float(pir.detach()),
            "anchor": float(anchor.detach()),
        }
        if config.check_every and self.step_count % config.check_every == 0:
            self._check()
        if self.done:
            self._restore_best()
        return dict(self.last)

    @torch.no_grad()
    def probe(self) -> dict[str, float]:
        """Both estimators' mean rate on the fixed probe latents (the check estimator's only when there is one)."""
        models = self.models
        images = torch.cat(
            [
                models.generator(self.probe_z[i : i + 256], self.probe_c[i : i + 256])
                for i in range(0, len(self.probe_z), 256)
            ]
        )
        values = {"estimated_pir": float(expected_rate(models.estimator(images), self.config.temperature).mean())}
        if models.check_estimator is not None:
            check = expected_rate(models.check_estimator(images), self.config.temperature).mean()
            values["check_pir"] = float(check)
        return values

    def _check(self) -> None:
        values = self.probe() | {"step": float(self.step_count)}
        self.checks.append(values)
        self.last |= {"probe_" + key: value for key, value in values.items() if key != "step"}
        if values["check_pir"] > self.best_check + self.config.min_delta:
            self.best_check, self.best_step, self.stale = values["check_pir"], self.step_count, 0
            self.best_state = copy.deepcopy(self.models.generator.state_dict())
        else:
            self.stale += 1
            if self.stale >= self.config.patience:
                self.stopped_early = True

    def start(self) -> None:
        """Records the untuned generator as the first check (step 0), so tuning that only hurts returns it."""
        if self.config.check_every and not self.checks:
            self._check()

    def _restore_best(self) -> None:
        if self.config.check_every and self.best_state is not None:
            self.models.generator.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.models.generator.state_dict(),
            "discriminator": self.models.discriminator.state_dict(),
            "g_opt": self.g_opt.state_dict(),
            "d_opt": self.d_opt.state_dict(),
            "step": self.step_count,
            "stopped_early": self.stopped_early,
            "best_check": self.best_check,
            "best_step": self.best_step,
            "stale": self.stale,
            "best_state": self.best_state if self.best_state is not None else {},
            "checks": [dict(check) for check in self.checks],
            "last": dict(self.last),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.models.generator.load_state_dict(state["generator"])
        self.models.discriminator.load_state_dict(state["discriminator"])
        self.g_opt.load_state_dict(state["g_opt"])
        self.d_opt.load_state_dict(state["d_opt"])
        self.step_count, self.stopped_early = int(state["step"]), bool(state["stopped_early"])
        self.best_check, self.best_step, self.stale = (
            float(state["best_check"]),
            int(state["best_step"]),
            int(state["stale"]),
        )
        self.best_state = dict(state["best_state"]) or None
        self.checks = [dict(check) for check in state["checks"]]
        self.last = dict(state["last"])
