"""Train the built-in classifiers on rendered scenes: `scenes-clf` (the optimisation target and built-in feature
extractor), `scenes-judge` (another architecture and seed, used only to judge jobs), `scenes-clf-alt` (the
second label set, time of day) and `scenes-judge-alt` (its judge, as `scenes-judge` is `scenes-clf`'s). Each trains
in minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from gansteer_server.data.scenes import CLASS_NAMES, TIME_NAMES, render_scenes
from gansteer_server.models.architectures import build_architecture

TRAIN_SEED, HELD_OUT_SEED = 200, 300


@dataclass(frozen=True)
class ClassifierSpec:
    name: str
    architecture: str
    label_set: str  # "class" or "time"
    seed: int
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    purpose: str = ""  # a sentence for the card, after what the classifier classifies
    judge: str = ""  # the classifier that judges jobs optimising against this one (card `extra.judge`)

    @property
    def label_names(self) -> tuple[str, ...]:
        return CLASS_NAMES if self.label_set == "class" else TIME_NAMES


CLASSIFIERS: tuple[ClassifierSpec, ...] = (
    ClassifierSpec(
        "scenes-clf",
        "scenes_classifier",
        "class",
        seed=1,
        architecture_kwargs={"widths": [16, 32, 64]},
        judge="scenes-judge",
    ),
    ClassifierSpec("scenes-judge", "scenes_resnet", "class", seed=2, architecture_kwargs={"widths": [16, 32, 64]}),
    ClassifierSpec(
        "scenes-clf-alt",
        "scenes_classifier",
        "time",
        seed=3,
        architecture_kwargs={"num_classes": 3, "widths": [16, 32, 64]},
        steps=600,
        judge="scenes-judge-alt",
    ),
    ClassifierSpec(
        "scenes-judge-alt",
        "scenes_resnet",
        "time",
        seed=4,
        architecture_kwargs={"num_classes": 3, "widths": [16, 32, 64]},
        steps=600,
        purpose="The independent judge of jobs that optimise against `scenes-clf-alt` (another architecture and "
        "seed, the same labels): never optimise against it.",
    ),
)


def images_to_tensor(images: Any) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float NCHW in [-1, 1], the convention of every built-in model."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(
        (model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(images), batch)
    )
    return correct / len(images)


def train_classifier(
    spec: ClassifierSpec, train_images: int = 40_000, held_out: int = 5_000
) -> tuple[nn.Module, float]:
    """Train one classifier with Adam and a cosine schedule; return it and its held-out accuracy."""
    torch.manual_seed(spec.seed)
    data = render_scenes(train_images, seed=TRAIN_SEED)
    test = render_scenes(held_out, seed=HELD_OUT_SEED)
    pick = (lambda s: s.labels) if spec.label_set == "class" else (lambda s: s.times)
    x, y = images_to_tensor(data.images), torch.from_numpy(pick(data))
    x_test, y_test = images_to_tensor(test.images), torch.from_numpy(pick(test))
    model = build_architecture(spec.architecture, **spec.architecture_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), spec.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, spec.lr, total_steps=spec.steps)
    started = time.time()
    for step in range(1, spec.steps + 1):
        model.train()
        index = torch.randint(0, len(x), (spec.batch_size,))
        batch = x[index]
        flip = torch.rand(len(batch)) < 0.5  # scenes are mirror-symmetric in distribution
        batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
        loss = F.cross_entropy(model(batch), y[index], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(
                f"{spec.name} step {step}/{spec.steps} loss {loss.item():.3f} ({time.time() - started:.0f}s)",
                flush=True,
            )
    held_out_accuracy = accuracy(model, x_test, y_test)
    print(f"{spec.name} held-out accuracy {held_out_accuracy:.4f}", flush=True)
    return model.eval(), held_out_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path("zoo-work/classifiers"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="names of the classifiers to train")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for spec in CLASSIFIERS:
        if args.only and spec.name not in args.only:
            continue
        model, held_out_accuracy = train_classifier(spec)
        save_file(model.state_dict(), str(args.work_dir / f"{spec.name}.safetensors"))
        (args.work_dir / f"{spec.name}.accuracy").write_text(f"{held_out_accuracy}\n")


if __name__ == "__main__":
    main()
