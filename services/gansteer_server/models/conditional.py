"""The conditional-generator interface every generator adapter implements, so job kinds reach a generator one way.

`G(z, condition) -> images` in the wire convention ([-1, 1]); a condition is class ids (N,) int64, free embedding
vectors (N, E) float, or None for an unconditional generator. Embedding activation maximisation reads and replaces
class rows; PIR tuning and human NES train a copy of the weights. The class-embedding table is reached here and
nowhere else: a module either has an `embedding` table (`nn.Embedding`, the built-in architecture and BigGAN's
shared embedding) or a `class_embedding(ids)` lookup.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from gansteer_server.models.card import ModelCard
from gansteer_server.models.store import model_to_wire


class ConditionalGenerator:
    """A generator module with its card: sampling, class rows and trainable copies."""

    def __init__(self, module: nn.Module, card: ModelCard) -> None:
        if card.kind != "generator":
            raise ValueError(f"{card.ref} is a {card.kind}, not a generator")
        self.module, self.card = module, card

    def __call__(self, z: Tensor, condition: Tensor | None) -> Tensor:
        return self.sample(z, condition)

    def sample(self, z: Tensor, condition: Tensor | None) -> Tensor:
        """Images in [-1, 1] for latents (N, Z) and ids (N,), vectors (N, E) or None."""
        images = self.module(z) if condition is None else self.module(z, condition)
        return model_to_wire(images, self.card)

    @property
    def conditional(self) -> bool:
        return bool(self.card.num_classes and self.card.embedding_size)

    def class_embeddings(self) -> Tensor | None:
        """The class rows (K, E) as they are now (a detached copy), None for an unconditional generator."""
        if not self.conditional:
            return None
        table = self._table()
        if table is not None:
            return table.weight.detach().clone()
        lookup = getattr(self.module, "class_embedding", None)
        if lookup is None:
            return None
        with torch.no_grad():
            return lookup(torch.arange(self.card.num_classes or 0)).detach().clone()  # type: ignore[no-any-return]

    def with_class_rows(self, rows: dict[int, Tensor]) -> ConditionalGenerator:
        """A copy whose class rows `rows` (class id -> (E,)) are replaced; this generator is left unchanged. A row
        may also be appended (id == K), for a label the generator was never trained on."""
        module = copy.deepcopy(self.module)
        table = _embedding_table(module, self.card)
        weight = table.weight.detach().clone()
        extra = sorted(i for i in rows if i >= len(weight))
        if extra and extra != list(range(len(weight), len(weight) + len(extra))):
            raise ValueError(f"new class ids must follow the {len(weight)} existing ones, got {extra}")
        if extra:
            weight = torch.cat([weight, weight.new_zeros(len(extra), weight.shape[1])])
        for index, row in rows.items():
            if index < 0 or row.shape != weight.shape[1:]:
                raise ValueError(f"row {index}: expected shape {tuple(weight.shape[1:])}, got {tuple(row.shape)}")
            weight[index] = row.detach().to(weight)
        replacement = nn.Embedding(len(weight), weight.shape[1], _weight=weight)
        replacement.weight.requires_grad_(table.weight.requires_grad)
        module.embedding = replacement
        card = self.card
        if extra:
            names = tuple(self.card.class_names or ()) + tuple(f"class_{i}" for i in extra)
            # The architecture builds its table from `num_classes` (the built-in ones default it): the weights must fit.
            kwargs = dict(self.card.architecture_kwargs or {}) | {"num_classes": len(weight)}
            card = _replace(
                self.card,
                num_classes=len(weight),
                class_names=names if self.card.class_names else None,
                architecture_kwargs=kwargs,
            )
        return ConditionalGenerator(module, card)

    def trainable_copy(self) -> nn.Module:
        """A deep copy of the module whose parameters take gradients (the served module stays frozen), in eval
        mode: the tuning loop decides whether batch-norm statistics move."""
        module = copy.deepcopy(self.module)
        for parameter in module.parameters():
            parameter.requires_grad_(True)
        return module.eval()

    def _table(self) -> nn.Embedding | None:
        table = getattr(self.module, "embedding", None)
        return table if isinstance(table, nn.Embedding) else None


def _embedding_table(module: nn.Module, card: ModelCard) -> nn.Embedding:
    table = getattr(module, "embedding", None)
    if not isinstance(table, nn.Embedding):
        raise ValueError(f"{card.ref} has no class embedding table (`embedding`) whose rows could be replaced")
    return table


def _replace(card: ModelCard, **changes: object) -> ModelCard:
    return ModelCard.from_dict(card.to_dict() | changes)
