"""`make zoo`: reproduce the built-in models from scratch and register them with cards, safetensors weights and
ONNX exports in the zoo shipped inside the package.

Steps, each skipped when its output exists (so an interrupted run resumes): train the four classifiers, train the
GAN (resuming from its checkpoint), then export: the generator's EMA weights with standing batch-norm statistics,
spectral norm folded into plain weights, and register every model, with the GAN's early training snapshots as
`scenes-gen-step<N>`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from gansteer_server.config import BUILTIN_REGISTRY
from gansteer_server.data.scenes import CLASS_NAMES
from gansteer_server.models import ModelRegistry
from gansteer_server.models.architectures import build_architecture
from gansteer_server.models.architectures.scenes import ScenesDiscriminator, ScenesGenerator
from gansteer_server.zoo import train_classifiers, train_gan
from gansteer_server.zoo.evaluate import SNAPSHOT_PREFIX

_IMAGES = {"resolution": 32, "channels": 3, "value_range": [-1.0, 1.0]}


def fold_spectral_norm(module: nn.Module) -> None:
    """Replace every spectral-norm parametrisation by the plain weight it currently yields."""
    for child in module.modules():
        if parametrize.is_parametrized(child):
            for name in list(child.parametrizations.keys()):  # type: ignore[union-attr]
                parametrize.remove_parametrizations(child, name, leave_parametrized=True)


@torch.no_grad()
def standing_statistics(generator: ScenesGenerator, batches: int = 200, batch_size: int = 64, seed: int = 0) -> None:
    """Recompute batch-norm running statistics for the EMA weights (BigGAN's standing stats): the statistics
    tracked during training belong to the raw weights, not their average."""
    torch.manual_seed(seed)
    for module in generator.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over all batches
    generator.train()
    for _ in range(batches):
        labels = torch.randint(0, generator.num_classes, (batch_size,))
        generator(torch.randn(batch_size, generator.z_size), labels)
    for module in generator.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    generator.eval()


def export_gan(checkpoint: Path, config: train_gan.GanTrainingConfig) -> tuple[ScenesGenerator, ScenesDiscriminator]:
    state = torch.load(checkpoint, weights_only=True)
    generator = ScenesGenerator(widths=config.generator_widths)
    generator.load_state_dict(state["ema"])
    discriminator = ScenesDiscriminator(widths=config.discriminator_widths)
    discriminator.load_state_dict(state["discriminator"])
    for module in (generator, discriminator):
        module.eval()
        fold_spectral_norm(module)
    standing_statistics(generator)
    print(f"exported the GAN of step {int(state['step'])}", flush=True)
    return generator, discriminator


class _GeneratorForOnnx(nn.Module):
    """ONNX graph G(z, embedding): the served class ids are looked up in the embedding table beforehand."""

    def __init__(self, generator: ScenesGenerator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.generator(z, embedding)


def export_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], output: str, path: Path) -> None:
    torch.onnx.export(
        module,
        inputs,
        str(path),
        dynamo=False,
        input_names=names,
        output_names=[output],
        dynamic_axes={name: {0: "batch"} for name in [*names, output]},
        opset_version=17,
    )


def register(registry: ModelRegistry, name: str, card: dict[str, Any], module: nn.Module, onnx: Path | None) -> None:
    with tempfile.TemporaryDirectory() as temp:
        weights = Path(temp) / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
        files: dict[str, Path | bytes] = {"weights.safetensors": weights}
        card = {**card, "format": "safetensors", "weights": "weights.safetensors"}
        if onnx is not None:
            files["model.onnx"] = onnx
            card["onnx"] = "model.onnx"
        entry = registry.register(name, card, files)
        print(f"registered {entry.ref} in {entry.folder}", flush=True)


def trained_classifiers(
    classifier_dir: Path, specs: tuple[train_classifiers.ClassifierSpec, ...]
) -> dict[str, tuple[train_classifiers.ClassifierSpec, nn.Module, float]]:
    """Each classifier with its held-out accuracy, trained unless `classifier_dir` holds its weights already."""
    classifier_dir.mkdir(parents=True, exist_ok=True)
    classifiers: dict[str, tuple[train_classifiers.ClassifierSpec, nn.Module, float]] = {}
    for spec in specs:
        weights = classifier_dir / f"{spec.name}.safetensors"
        if not weights.exists():
            model, held_out = train_classifiers.train_classifier(spec)
            save_file(model.state_dict(), str(weights))
            (classifier_dir / f"{spec.name}.accuracy").write_text(f"{held_out}\n")
        model = build_architecture(spec.architecture, **spec.architecture_kwargs)
        model.load_state_dict(load_file(str(weights)))
        classifiers[spec.name] = (spec, model.eval(), float((classifier_dir / f"{spec.name}.accuracy").read_text()))
    return classifiers


def register_classifier(
    registry: ModelRegistry, spec: train_classifiers.ClassifierSpec, model: nn.Module, held_out: float
) -> None:
    with tempfile.TemporaryDirectory() as temp:
        onnx = Path(temp) / f"{spec.name}.onnx"
        export_onnx(model, (torch.zeros(2, 3, 32, 32),), ["images"], "logits", onnx)
        description = (
            f"Classifier of the scenes' {spec.label_set} labels; `features()` exposes stage1..stage3 and the "
            f"penultimate vector. {spec.purpose}"
        )
        register(
            registry,
            spec.name,
            {
                "kind": "classifier",
                "architecture": spec.architecture,
                "architecture_kwargs": spec.architecture_kwargs,
                "num_classes": len(spec.label_names),
                "class_names": list(spec.label_names),
                **_IMAGES,
                "metrics": {"held_out_accuracy": held_out},
                "description": description.strip(),
                **({"extra": {"judge": spec.judge}} if spec.judge else {}),
            },
            model,
            onnx,
        )


def build(work_dir: Path, registry_root: Path, gan_minutes: float | None, replace: bool) -> None:
    classifiers = trained_classifiers(work_dir / "classifiers", train_classifiers.CLASSIFIERS)

    config = train_gan.GanTrainingConfig()
    checkpoint = train_gan.train(config, work_dir / "gan", gan_minutes)
    if _step(checkpoint) < config.steps:
        print("the GAN stopped early; run again to resume it", flush=True)
        return

    if replace:
        for name in ("scenes-gen", "scenes-disc", *classifiers):
            for folder in registry_root.glob(f"{name}@*"):
                shutil.rmtree(folder)
        for folder in registry_root.glob(f"{SNAPSHOT_PREFIX}*@*"):
            shutil.rmtree(folder)
    registry = ModelRegistry([registry_root])
    register_gan(registry, work_dir / "gan")
    register_snapshots(registry, work_dir / "gan")
    for spec, model, held_out in classifiers.values():
        register_classifier(registry, spec, model, held_out)


def register_new_classifiers(registry: ModelRegistry, classifier_dir: Path) -> None:
    """Train and register the classifiers of `train_classifiers.CLASSIFIERS` that the registry lacks (one added to
    the zoo), leaving every registered model as it is."""
    specs = tuple(s for s in train_classifiers.CLASSIFIERS if not registry.versions(s.name))
    for spec, model, held_out in trained_classifiers(classifier_dir, specs).values():
        register_classifier(registry, spec, model, held_out)


def _step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, weights_only=True)["step"]) if checkpoint.exists() else 0


def _generator_card(config: train_gan.GanTrainingConfig, generator: ScenesGenerator) -> dict[str, Any]:
    return {
        "kind": "generator",
        "architecture": "scenes_generator",
        "architecture_kwargs": {"widths": list(config.generator_widths), "spectral_norm": False},
        "latent_size": generator.z_size,
        "latent_prior": {"type": "standard_normal"},
        "num_classes": len(CLASS_NAMES),
        "class_names": list(CLASS_NAMES),
        "embedding_size": generator.embedding_size,
        **_IMAGES,
    }


# The companions a job uses when a generator's spec names none: realism, feature statistics, judging.
_COMPANIONS = {"discriminator": "scenes-disc", "feature_extractor": "scenes-clf", "judge": "scenes-judge"}


def register_gan(registry: ModelRegistry, gan_dir: Path) -> None:
    """Register the trained GAN as the newest `scenes-gen` and `scenes-disc`."""
    config = train_gan.GanTrainingConfig()
    generator, discriminator = export_gan(gan_dir / "checkpoint.pt", config)
    with tempfile.TemporaryDirectory() as temp:
        onnx = Path(temp) / "generator.onnx"
        z, embedding = torch.randn(2, generator.z_size), generator.embedding.weight[:2].detach()
        export_onnx(_GeneratorForOnnx(generator), (z, embedding), ["z", "embedding"], "images", onnx)
        card = {
            **_generator_card(config, generator),
            "description": "BigGAN-style class-conditional generator of 32x32 scenes (EMA weights). "
            "ONNX export takes (z, embedding); look class ids up in `embedding.weight`.",
            "extra": _COMPANIONS,
        }
        register(registry, "scenes-gen", card, generator, onnx)
    register(
        registry,
        "scenes-disc",
        {
            "kind": "discriminator",
            "architecture": "scenes_discriminator",
            "architecture_kwargs": {"widths": list(config.discriminator_widths), "spectral_norm": False},
            "num_classes": len(CLASS_NAMES),
            "class_names": list(CLASS_NAMES),
            **_IMAGES,
            "description": "Projection discriminator trained with scenes-gen (hinge loss); higher is more real.",
        },
        discriminator,
        None,
    )


def register_snapshots(registry: ModelRegistry, gan_dir: Path) -> None:
    """Register the GAN's early snapshots found in `gan_dir` as `scenes-gen-step<N>` (those not registered yet),
    without ONNX exports (the zoo's weights stay within budget; the torch weights serve every job)."""
    config = train_gan.GanTrainingConfig()
    for step in config.snapshot_steps:
        snapshot = train_gan.snapshot_path(gan_dir, step)
        if registry.versions(f"{SNAPSHOT_PREFIX}{step}"):
            continue
        if not snapshot.exists():
            print(f"no snapshot of step {step} in {gan_dir}; skipped", flush=True)
            continue
        generator, _ = export_gan(snapshot, config)
        card = {
            **_generator_card(config, generator),
            "description": f"An early training snapshot of scenes-gen: its EMA weights at step {step} of "
            f"{config.steps:,} ({100 * step / config.steps:.0f}%; before step {config.ema_start:,} the EMA is the "
            "raw generator). A weaker generator for tests and forking analyses.",
            "extra": {**_COMPANIONS, "snapshot_of": "scenes-gen", "step": step},
        }
        register(registry, f"{SNAPSHOT_PREFIX}{step}", card, generator, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path("zoo-work"))
    parser.add_argument("--registry", type=Path, default=BUILTIN_REGISTRY)
    parser.add_argument("--gan-minutes", type=float, default=None, help="wall-time budget for this GAN run")
    parser.add_argument("--keep", action="store_true", help="add new versions instead of replacing the zoo's")
    parser.add_argument(
        "--snapshots-only", action="store_true", help="only register the snapshots found in WORK_DIR/gan"
    )
    parser.add_argument(
        "--new-classifiers-only",
        action="store_true",
        help="only train (into WORK_DIR/classifiers) and register the classifiers the registry lacks",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.snapshots_only:
        register_snapshots(ModelRegistry([args.registry]), args.work_dir / "gan")
        return
    if args.new_classifiers_only:
        register_new_classifiers(ModelRegistry([args.registry]), args.work_dir / "classifiers")
        return
    build(args.work_dir, args.registry, args.gan_minutes, replace=not args.keep)


if __name__ == "__main__":
    main()
