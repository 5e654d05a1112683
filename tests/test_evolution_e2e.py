"""Interactive evolution end to end: `client.evolve` submits it, a worker subprocess on the real Redis breeds the
rounds, the generation service renders them, and a simulated person (`gansteer.simulate`) answers through the same
SDK calls a person's UI makes. The person's extras go the same way: none is good, undo, a step size; bad answers are
refused naming the field; a resent answer is recorded once; the interaction log holds every shown image with its
lineage."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from job_fixtures import CLF, GEN, sdk_stack, target_png

from gansteer import Client, InvalidArgument, JobState, RoundClosed, load_result
from gansteer.simulate import SimulatedPerson, Target
from gansteer.types import Round
from gansteer_server.algorithms.interactive import DEFAULT_MUTATION_RATE

pytestmark = [pytest.mark.service, pytest.mark.job, pytest.mark.slow]
SMALL = {"mu": 3, "offspring": 7}  # 8 images a round


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, list[str]]]:
    with sdk_stack(tmp_path_factory.mktemp("evolution"), timeout=30) as (client, _, addresses):
        yield client, addresses


def next_round(job: Any, after: str = "") -> Round:
    for round in job.rounds():
        if round.round_id != after:
            return round  # type: ignore[no-any-return]
    raise AssertionError(f"job {job.id} ended without another round: {job.status()}")


@pytest.fixture
def client(services: tuple[Client, list[str]]) -> Client:
    return services[0]


def test_a_simulated_person_evolves_through_the_sdk_and_the_log_keeps_the_lineage(client: Client) -> None:
    person = SimulatedPerson(client, Target(target_png(3)), perceive_with=CLF, noise=0.05, rater_id="sim-e2e")
    job = client.evolve(model=GEN, rounds=3, seed=11, conditioned_class=2, **SMALL)  # type: ignore[arg-type]
    status = person.answer(job)
    assert status.state is JobState.SUCCEEDED, status.error

    log = job.interactions()
    assert [entry.round for entry in log] == [1, 2, 3] and all(len(entry.items) == 8 for entry in log)
    assert all(entry.choice is not None and len(entry.choice) == 3 for entry in log)
    assert len({entry.rater for entry in log}) == 1 and log[0].rater != "sim-e2e"  # a pseudonym
    assert all(item.class_id == 2 for entry in log for item in entry.items)
    first_ids = {item.item_id for item in log[0].items}
    assert all(item.seed > 0 and item.parent_ids == () for item in log[0].items)  # prior draws, regenerable
    for before, after in itertools.pairwise(log):
        picked = {before.items[i].item_id for i in before.choice or ()}
        parents = {parent for item in after.items for parent in item.parent_ids}
        assert parents == picked  # every shown image names the picks it was bred from
    positions = [[item.item_id for item in entry.items] for entry in log]
    assert any(ids != sorted(ids, key=lambda i: int(i.split("-")[1])) for ids in positions)  # shuffled, recorded
    assert first_ids.isdisjoint({item.item_id for item in log[1].items})

    result = job.result(wait=False)
    last = log[-1]
    best = last.items[(last.choice or ())[0]]
    assert result.latents is not None and np.allclose(result.latents[0], best.latent, atol=1e-6)  # the first pick
    assert len(result.images) == len(set(last.choice or ())) and result.metrics["rounds_answered"] == 3


def test_none_is_good_undo_and_a_step_size_and_bad_answers_refused_naming_the_field(client: Client) -> None:
    job = client.evolve(model=GEN, rounds=5, seed=4, **SMALL)  # type: ignore[arg-type]
    first = next_round(job)
    assert first.actions == ("none_good", "undo") and first.step_size == pytest.approx(DEFAULT_MUTATION_RATE)
    assert all(item.embedding is not None for item in first.items)  # the class vector is evolved

    with pytest.raises(InvalidArgument) as caught:
        job.feedback(first, choice=[0, 8, 1])
    assert caught.value.field == "choice.indices[1]"
    with pytest.raises(InvalidArgument) as caught:
        job.feedback(first, choice=[0, 1])
    assert caught.value.field == "choice.indices"
    with pytest.raises(InvalidArgument) as caught:
        job.feedback(first, choice=[0, 1, 2], step_size=2.0)
    assert caught.value.field == "choice.step_size"
    with pytest.raises(InvalidArgument) as caught:
        client.evolve(model=GEN, fixed_mutation_rate=True, adapt_mutation_rate=True)
    assert caught.value.field == "spec.interactive_evolution.fixed_mutation_rate"

    job.feedback(first, action="none_good", idempotency_key="none-1")
    again = job.feedback(first, action="none_good", idempotency_key="none-1")  # a double click
    assert again.duplicate
    redrawn = next_round(job, after=first.round_id)
    assert {i.item_id for i in redrawn.items}.isdisjoint({i.item_id for i in first.items})
    with pytest.raises(RoundClosed) as closed:
        job.feedback(first, choice=[0, 1, 2])  # a round already answered
    assert closed.value.field == "round_id" and closed.value.round_id == first.round_id

    other = client.evolve(model=GEN, rounds=1, seed=5, **SMALL)  # type: ignore[arg-type]
    other_round = next_round(other)
    with pytest.raises(RoundClosed) as closed:
        job.feedback(other_round, choice=[0, 1, 2])  # another job's round
    assert closed.value.field == "round_id"
    other.cancel()

    job.feedback(redrawn, choice=[4, 4, 1], step_size=0.5)
    bred = next_round(job, after=redrawn.round_id)
    assert bred.step_size == 0.5
    job.feedback(bred, action="undo")
    back = next_round(job, after=bred.round_id)
    assert sorted(i.item_id for i in back.items) == sorted(i.item_id for i in redrawn.items)
    assert back.round > bred.round
    job.cancel()

    log = job.interactions()
    assert [entry.action for entry in log] == ["none_good", "pick", "undo"]
    assert log[1].step_size == 0.5 and log[1].choice == (4, 4, 1)


def test_the_cli_runs_an_evolution_answered_by_a_simulated_person(
    services: tuple[Client, list[str]], tmp_path: Path
) -> None:
    from gansteer.cli import main

    target = tmp_path / "target.png"
    target.write_bytes(target_png(7))
    out = tmp_path / "out"
    optimization, generation, scoring = services[1]
    connection = ["--target", optimization, "--generation-target", generation, "--scoring-target", scoring, "-q"]
    evolve = ["evolve", "--model", GEN, "--rounds", "2", "--mu", "2", "--offspring", "3", "--out", str(out)]
    code = main([*connection, *evolve, "--simulate", str(target), "--perceive-with", CLF])
    assert code == 0 and (out / "result_0.png").is_file()
    assert load_result(out).generator == f"{GEN}@1"  # the picks saved with what regenerates them
