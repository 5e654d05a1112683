"""Interactive evolution, HEVOL (seed 003): `InteractiveEvolutionSpec` -> a validated spec ->
`algorithms.interactive.EvolutionRun`, one round per step.

Each step opens a round (a `choice` of mu picks with repeats, or none is good, or undo, and a step size) and the job
waits for it holding no worker; the answer comes back through `receive`. The worker renders nothing for a round:
items are latents and seeds, and whoever shows them asks the generation service. Only `preview` and `result` run
the generator, for the latest picks.

Positions are randomised: a round shows its items in an order drawn from the job's seed and the round's number (a
person favours the first images of a grid; the recombination would otherwise always come first), the round and the
interaction log record that order (the items in the order shown), and `receive` maps the picked positions back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from google.protobuf.message import Message
from torch import Tensor

from gansteer_server.algorithms.interactive import DEFAULT_MUTATION_RATE, EvolutionConfig, EvolutionRun
from gansteer_server.jobs.backends import GeneratorModel, ModelBackend
from gansteer_server.jobs.kinds import JobKind, JobRun, StepProgress, SubmitContext, register_kind
from gansteer_server.jobs.rounds import Answer, Round, RoundItem
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire import spec_fields
from gansteer_server.wire.convert import float_tensor
from gansteer_server.wire.errors import invalid_argument

FIELD = "spec.interactive_evolution"


@dataclass(frozen=True)
class EvolutionJobSpec:
    """A validated HEVOL job: the pinned generator, its latent size, the class mode and the algorithm's config."""

    generator: str
    z_size: int
    class_id: int | None  # held fixed; None with `evolve_class` or for an unconditional generator
    evolve_class: bool
    config: EvolutionConfig
    round_expiry_s: float = 0.0
    backend: str = ""


class InteractiveEvolutionJob(JobKind):
    name = "interactive_evolution"
    spec_type = EvolutionJobSpec
    spec_message = opt.InteractiveEvolutionSpec
    description = (
        "A person picks the mu best of 1 + lambda images each round; a (mu/mu + lambda) evolution strategy breeds the "
        "next round from the picks (HEVOL, seed 003). No target needed."
    )
    has_rounds = True
    defaults: ClassVar[Mapping[str, Any]] = {
        "mu": EvolutionConfig.mu,
        "offspring": EvolutionConfig.offspring,
        "mutation_rate": DEFAULT_MUTATION_RATE,
        "rounds": "0: until cancelled",
        "condition": "evolve the class vector (class-conditional generators)",
        "seed": 0,
        "fixed_mutation_rate": "the rate is fixed unless adapt_mutation_rate",
        "adapt_mutation_rate": False,
        "round_expiry_s": "deployment default",
        "backend": "deployment default",
    }

    def parse(self, message: Message, context: SubmitContext) -> EvolutionJobSpec:
        assert isinstance(message, opt.InteractiveEvolutionSpec)
        card = context.model(message.generator, f"{FIELD}.generator", ("generator",))
        z_size, classes = card.latent_size or 0, card.num_classes or 0
        mu, offspring = message.mu or EvolutionConfig.mu, message.offspring or EvolutionConfig.offspring
        if not 0 <= message.offspring <= context.settings.max_population:
            raise invalid_argument(
                f"{FIELD}.offspring", f"must be 0 (27) to {context.settings.max_population}, got {message.offspring}"
            )
        if not 0 <= message.mu <= 1 + offspring:
            raise invalid_argument(
                f"{FIELD}.mu", f"must be 0 (5) to the {1 + offspring} images shown per round, got {message.mu}"
            )
        rate = message.mutation_rate
        if not (math.isfinite(rate) and 0 <= rate <= 1):
            message_text = f"must lie in [0, 1] (0: {DEFAULT_MUTATION_RATE}), got {rate}"
            raise invalid_argument(f"{FIELD}.mutation_rate", message_text)
        if not 0 <= message.rounds <= context.settings.max_budget:
            raise invalid_argument(
                f"{FIELD}.rounds", f"must be 0 (until cancelled) to {context.settings.max_budget}, got {message.rounds}"
            )
        expiry = message.round_expiry_s
        if not (math.isfinite(expiry) and 0 <= expiry <= context.settings.round_expiry_s):
            raise invalid_argument(
                f"{FIELD}.round_expiry_s",
                f"must be 0 (the default) to {context.settings.round_expiry_s:g} s, got {expiry}",
            )
        if message.fixed_mutation_rate and message.adapt_mutation_rate:
            message_text = "a fixed rate cannot also self-adapt; leave fixed_mutation_rate unset (the default now)"
            raise invalid_argument(f"{FIELD}.fixed_mutation_rate", message_text)
        class_id = self._class(message, classes, card.ref)
        config = EvolutionConfig(
            mu=mu,
            offspring=offspring,
            mutation_rate=rate,
            rounds=message.rounds,
            adapt_mutation_rate=message.adapt_mutation_rate,
            seed=message.seed,
        )
        return EvolutionJobSpec(
            generator=card.ref,
            z_size=z_size,
            class_id=class_id,
            evolve_class=bool(classes) and class_id is None,
            config=config,
            round_expiry_s=expiry,
            backend=spec_fields.BACKENDS.get(message.backend, ""),
        )

    @staticmethod
    def _class(message: opt.InteractiveEvolutionSpec, classes: int, model: str) -> int | None:
        field = f"{FIELD}.condition"
        which = message.condition.WhichOneof("condition")
        if which is None:
            return None
        if which == "embeddings":
            message_text = "a fixed free class vector is not supported; give one class id"
            raise invalid_argument(f"{field}.embeddings", message_text)
        ids = list(message.condition.class_ids.ids)
        if len(ids) != 1:
            raise invalid_argument(f"{field}.class_ids.ids", f"give exactly one class id, got {len(ids)}")
        return spec_fields.class_id(ids[0], f"{field}.class_ids.ids[0]", classes, model)

    def total_steps(self, spec: EvolutionJobSpec) -> int:
        return spec.config.rounds

    def start(self, spec: EvolutionJobSpec, backend: ModelBackend, settings: JobSettings) -> JobRun:
        generator = backend.generator(spec.generator)
        rows = generator.class_embeddings() if spec.evolve_class else None
        run = EvolutionRun(spec.config, spec.z_size, None if rows is None else rows.detach().float().cpu())
        return EvolutionJobRun(spec, run, generator)


class EvolutionJobRun:
    """The runner's view of an EvolutionRun: a step opens a round, `receive` takes its answer."""

    def __init__(self, spec: EvolutionJobSpec, run: EvolutionRun, generator: GeneratorModel) -> None:
        self.spec, self.run, self.generator = spec, run, generator
        self._steps = 0
        self._awaiting = False

    @property
    def done(self) -> bool:
        return self.run.done

    @property
    def steps(self) -> int:
        return self._steps

    def step(self) -> StepProgress:
        if self._awaiting:
            raise RuntimeError("a round is open: its answer comes first")
        generation = self.run.open_round()
        self._steps += 1
        self._awaiting = True
        order = self._order(generation.number, len(generation.item_ids))
        items = tuple(
            RoundItem(
                item_id=generation.item_ids[i],
                latent=generation.z[i],
                seed=generation.seeds[i],
                class_id=self.spec.class_id,
                class_vector=None if generation.class_vectors is None else generation.class_vectors[i],
                parent_ids=generation.parent_ids[i],
            )
            for i in order
        )
        round_ = Round(
            number=generation.number,
            answer="choice",
            items=items,
            generator=self.spec.generator,
            choose=self.spec.config.mu,
            allow_repeats=True,
            expires_in_s=self.spec.round_expiry_s,
            actions=("none_good", "undo"),
            step_size=self.run.rate,
        )
        criterion = {"mutation_rate": self.run.rate, "rounds_answered": float(self.run.answered)}
        return StepProgress(step=self._steps, generator_calls=self.run.shown_images, criterion=criterion, round=round_)

    def receive(self, answers: list[Answer]) -> None:
        if not self._awaiting:
            raise RuntimeError("answers arrived with no round open")
        answer = answers[0]  # the round asks for one answer (answers_required 1)
        top = self.run.stack[-1]
        order = self._order(top.number, len(top.item_ids))
        self.run.tell(answer.action, [order[i] for i in answer.choice], answer.step_size)
        self._awaiting = False

    def _order(self, number: int, size: int) -> list[int]:
        """The positions of a round's items: a permutation drawn from the job's seed and the round's number."""
        generator = torch.Generator().manual_seed(self.spec.config.seed * 1_000_003 + number)
        return [int(i) for i in torch.randperm(size, generator=generator)]

    def _render(self) -> tuple[Tensor, Tensor, Tensor | None]:
        picks = self.run.picks()
        z = torch.stack([p[1] for p in picks])
        vectors = torch.stack([p[2] for p in picks]) if all(p[2] is not None for p in picks) else None  # type: ignore[misc]
        if self.spec.class_id is not None:
            condition: Tensor | None = torch.full((len(z),), self.spec.class_id, dtype=torch.int64)
        else:
            condition = vectors
        with torch.no_grad():
            images = self.generator(z, condition).float().clamp(-1, 1)
        return images, z, vectors

    def preview(self) -> Tensor:
        return self._render()[0][:1]

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run.state_dict(), "steps": self._steps, "awaiting": self._awaiting}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run.load_state_dict(state["run"])
        self._steps, self._awaiting = int(state["steps"]), bool(state["awaiting"])

    def result(self) -> opt.JobResult:
        """The latest picks, distinct, the person's first pick first (Algorithm 1 returns z_1)."""
        images, z, vectors = self._render()
        result = opt.JobResult()
        result.images.tensor.CopyFrom(float_tensor(images))
        result.latents.CopyFrom(float_tensor(z))
        if vectors is not None:
            result.class_embeddings.CopyFrom(float_tensor(vectors))
        if self.spec.class_id is not None:
            result.class_ids.extend([self.spec.class_id] * len(z))
        result.generator.name, result.generator.version = self.generator.card.name, self.generator.card.version
        for rank in range(len(z)):
            values = {"rank": float(rank)}
            if self.spec.class_id is not None:
                values["class_id"] = float(self.spec.class_id)
            result.item_metrics.add(values=values)
        result.metrics["rounds_answered"] = float(self.run.answered)
        result.metrics["rounds_shown"] = float(self.run.opened)
        result.metrics["images_shown"] = float(self.run.shown_images)
        result.metrics["mutation_rate"] = float(self.run.rate)
        return result


register_kind(InteractiveEvolutionJob())
