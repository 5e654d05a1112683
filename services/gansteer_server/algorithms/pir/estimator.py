"""Training the PIR estimator (seed 000, appendix C.3): a pretrained backbone with a B-bin softmax head, classified
into the bin of each image's observed rate, Adam at 5e-4; used frozen with the softmax temperature lowered to 0.01.

One `step()` is one epoch over the training split; the held-out split's loss is measured after each, and the
weights with the lowest held-out loss are kept (the seed does not say when it stopped; this is the usual rule).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gansteer_server.algorithms.pir.interactions import rate_bins


@dataclass(frozen=True)
class EstimatorConfig:
    bins: int = 100
    learning_rate: float = 5e-4  # appendix C.3
    epochs: int = 30
    batch_size: int = 64
    held_out: float = 0.1  # share of images kept out of training to report a held-out loss
    temperature: float = 0.01  # at use, not in training (C.3)
    seed: int = 0


def expected_rate(logits: Tensor, temperature: float) -> Tensor:
    """E[PIR] = sum_b softmax(logits / T)_b * (b + 1/2) / B, as the scoring service's `pir` output computes it."""
    bins = logits.shape[1]
    centres = (torch.arange(bins, device=logits.device, dtype=logits.dtype) + 0.5) / bins
    return F.softmax(logits / temperature, dim=1) @ centres


class EstimatorTraining:
    """Trains `estimator` (logits over bins) on images and observed rates; resumable from `state_dict()`."""

    def __init__(self, estimator: nn.Module, images: Tensor, rates: Tensor, config: EstimatorConfig) -> None:
        if len(images) != len(rates):
            raise ValueError(f"{len(images)} images but {len(rates)} rates")
        if len(images) < config.bins:
            raise ValueError(f"{len(images)} images are fewer than the estimator's {config.bins} bins")
        self.estimator, self.config = estimator, config
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
        held = max(1, round(config.held_out * len(images))) if config.held_out > 0 else 0
        self.held_index, self.train_index = order[:held], order[held:]
        self.images, self.targets, self.rates = images, rate_bins(rates, config.bins), rates
        self.optimizer = torch.optim.Adam(estimator.parameters(), lr=config.learning_rate)
        self.epoch = 0
        self.best_loss = float("inf")
        self.best_state: dict[str, Tensor] = copy.deepcopy(estimator.state_dict())
        self.curve: list[tuple[float, float]] = []  # (train loss, held-out loss) per epoch

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    def step(self) -> dict[str, float]:
        """One epoch; returns its mean training loss and the held-out loss after it."""
        self.estimator.train()
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch)
        shuffled = self.train_index[torch.randperm(len(self.train_index), generator=generator)]
        total, count = 0.0, 0
        for start in range(0, len(shuffled), self.config.batch_size):
            index = shuffled[start : start + self.config.batch_size]
            if len(index) < 2:
                continue  # batch norm needs two images
            loss = F.cross_entropy(self.estimator(self.images[index]), self.targets[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total, count = total + float(loss.detach()) * len(index), count + len(index)
        self.epoch += 1
        held = self.held_out_loss()
        if held <= self.best_loss:
            self.best_loss, self.best_state = held, copy.deepcopy(self.estimator.state_dict())
        self.curve.append((total / max(count, 1), held))
        return {"train_loss": total / max(count, 1), "held_out_loss": held}

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """Cross-entropy on the held-out images (the training loss when nothing is held out)."""
        index = self.held_index if len(self.held_index) else self.train_index
        self.estimator.eval()
        return float(F.cross_entropy(self.estimator(self.images[index]), self.targets[index]))

    @torch.no_grad()
    def held_out_error(self) -> float:
        """Mean absolute error of the estimated rate (at the use temperature) on the held-out images."""
        index = self.held_index if len(self.held_index) else self.train_index
        self.estimator.eval()
        estimate = expected_rate(self.estimator(self.images[index]), self.config.temperature)
        return float((estimate - self.rates[index]).abs().mean())

    def finish(self) -> nn.Module:
        """The estimator at its lowest held-out loss, frozen, in eval mode."""
        self.estimator.load_state_dict(self.best_state)
        for parameter in self.estimator.parameters():
            parameter.requires_grad_(False)
        return self.estimator.eval()

    def state_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best_loss": self.best_loss,
            "best_state": self.best_state,
            "curve": [list(point) for point in self.curve],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.estimator.load_state_dict(state["estimator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.best_loss = int(state["epoch"]), float(state["best_loss"])
        self.best_state = dict(state["best_state"])
        self.curve = [(float(a), float(b)) for a, b in state["curve"]]
