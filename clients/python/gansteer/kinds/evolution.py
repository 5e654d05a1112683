"""Interactive evolution, HEVOL (seed 003): a person (or `gansteer.simulate`) picks the mu best of 1 + lambda images
each round and the job breeds the next round from the picks. Its options, its spec builder and the type its results
come back as; `Client.evolve` submits it, `Job.rounds()` / `Job.answer_rounds(...)` answer it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Unpack

from gansteer._convert import model_ref
from gansteer._specs import ClassSpec, class_id
from gansteer.kinds._common import Backend, JobOptions, Kind, backend, job_spec, option_names
from gansteer.types import JobResult, ModelInfo
from gansteer.v1 import optimization_pb2


class EvolutionOptions(JobOptions, total=False):
    """The settings of an interactive evolution (optimization.proto, InteractiveEvolutionSpec) besides its generator.
    Every one is optional; an unset one takes the server's default (the seed's 5 picks of 28 images; the picks shown
    again beside their recombination and offspring; mutation rate 0.2, fixed)."""

    mu: int  # picks per round (5)
    offspring: int  # lambda: each round shows 1 + offspring images (27)
    mutation_rate: float  # the step size: probability of resampling each latent coordinate (0: the server's, 0.2)
    rounds: int  # picks answered before the job ends on its own (0: until cancelled)
    conditioned_class: ClassSpec  # hold this class (id or name) fixed; unset: evolve the class vector too
    seed: int
    fixed_mutation_rate: bool  # no self-adaptation of the mutation rate (the default now; kept for old callers)
    adapt_mutation_rate: bool  # self-adapt the mutation rate (the seed's automatic update of the rates)
    round_expiry_s: float  # how long a round waits for its answer (0: the server's default)
    backend: Backend


@dataclass(frozen=True)
class EvolutionResult(JobResult):
    """An interactive evolution's result: the latest picks, distinct, the first pick (the person's best) first."""

    @property
    def rounds_answered(self) -> int:
        return int(self.metrics.get("rounds_answered", 0))


EVOLUTION = Kind(
    "interactive_evolution", method="evolve", options=option_names(EvolutionOptions), result=EvolutionResult
)


def evolution_spec(
    *, model: str, card: ModelInfo | None = None, **options: Unpack[EvolutionOptions]
) -> optimization_pb2.JobSpec:
    """The JobSpec of an interactive evolution; `card` (the generator's) is needed only for a class given by name."""
    EVOLUTION.check(options)
    spec = optimization_pb2.InteractiveEvolutionSpec(
        generator=model_ref(model),
        mu=options.get("mu", 0),
        offspring=options.get("offspring", 0),
        mutation_rate=options.get("mutation_rate", 0.0),
        rounds=options.get("rounds", 0),
        seed=options.get("seed", 0),
        fixed_mutation_rate=options.get("fixed_mutation_rate", False),
        adapt_mutation_rate=options.get("adapt_mutation_rate", False),
        round_expiry_s=options.get("round_expiry_s", 0.0),
    )
    if "conditioned_class" in options:
        chosen = class_id(options["conditioned_class"], card, field="conditioned_class")
        spec.condition.class_ids.ids.append(chosen)
    if "backend" in options:
        spec.backend = backend(options["backend"])
    return job_spec("interactive_evolution", spec, options)
