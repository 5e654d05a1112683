"""HEVOL's algorithm (seed 003, Algorithm 1 with a person as the selection): the first round draws from the prior, a
pick answer breeds the recombination, the picks again and mutated copies of the picks (repeats weighing more), none
is good draws again, undo shows the previous round again, a step size sets the mutation rate, every item names its
parents, and a run reloaded from its state continues exactly. Also the answer checks of a round that offers
actions."""

from __future__ import annotations

import io

import pytest
import torch

from gansteer_server.algorithms.interactive import DEFAULT_MUTATION_RATE, EvolutionConfig, EvolutionRun
from gansteer_server.jobs.rounds import Round, RoundItem, check_answer, round_message
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire.errors import ServiceError

D, E = 32, 6


def run(rows: bool = True, **config: object) -> EvolutionRun:
    class_rows = torch.randn(4, E, generator=torch.Generator().manual_seed(9)) if rows else None
    return EvolutionRun(EvolutionConfig(**config), D, class_rows)  # type: ignore[arg-type]


def test_the_first_round_is_drawn_from_the_prior_each_item_from_its_own_seed() -> None:
    first = run(seed=3).open_round()
    assert first.number == 1 and len(first.item_ids) == 28 and first.z.shape == (28, D)
    assert all(seed > 0 for seed in first.seeds) and all(parents == () for parents in first.parent_ids)
    again = torch.randn(D, generator=torch.Generator().manual_seed(first.seeds[5]))
    assert torch.equal(first.z[5], again)  # an item is regenerable from its seed alone
    assert first.class_vectors is not None and first.class_vectors.shape == (28, E)


def test_picks_breed_their_recombination_the_picks_again_and_mutated_copies_with_their_lineage() -> None:
    evolution = run(seed=1, adapt_mutation_rate=False)
    first = evolution.open_round()
    picks = [4, 4, 7, 1, 2]  # the same image twice
    evolution.tell("pick", picks)
    second = evolution.open_round()
    assert second.number == 2 and second.picks_before == tuple(picks) and len(second.item_ids) == 28
    mean = first.z[picks].mean(0)
    expected = mean * first.z[picks].norm(dim=1).mean() / mean.norm()  # scaled back to the picks' norm
    assert torch.allclose(second.z[0], expected, atol=1e-6)
    assert second.parent_ids[0] == ("r1-4", "r1-7", "r1-1", "r1-2")
    assert first.class_vectors is not None and second.class_vectors is not None
    assert torch.allclose(second.class_vectors[0], first.class_vectors[picks].mean(0))
    distinct = [4, 7, 1, 2]
    for k, source in enumerate(distinct, start=1):  # the picks again, unchanged: the plus selection
        assert torch.equal(second.z[k], first.z[source]) and second.seeds[k] == first.seeds[source]
        assert torch.equal(second.class_vectors[k], first.class_vectors[source])
        assert second.parent_ids[k] == (f"r1-{source}",)
    offspring = range(1 + len(distinct), 28)
    for k in offspring:
        source = picks[(k - 5) % 5]  # the picks in turn: a picked-twice image has twice the offspring
        assert second.parent_ids[k] == (f"r1-{source}",) and second.seeds[k] == 0
        assert (second.z[k] != first.z[source]).sum() >= 1  # at least one coordinate resampled (`repeat`)
        assert torch.equal(second.class_vectors[k], first.class_vectors[source])  # the class is recombined only
    # The default rate resamples about DEFAULT_MUTATION_RATE of the coordinates (at least one).
    changed = torch.stack([(second.z[k] != first.z[picks[(k - 5) % 5]]).float() for k in offspring])
    assert evolution.rate == DEFAULT_MUTATION_RATE
    assert abs(changed.mean().item() - DEFAULT_MUTATION_RATE) < 0.05


def test_without_keep_picks_and_with_fresh_draws_the_round_is_filled_otherwise() -> None:
    plain = run(seed=1, adapt_mutation_rate=False, keep_picks=False, mutation_rate=1 / D)
    first = plain.open_round()
    plain.tell("pick", [4, 4, 7, 1, 2])
    second = plain.open_round()
    for k in range(1, 28):  # Algorithm 1 without the kept picks: 27 offspring, one or two coordinates each
        assert second.parent_ids[k] == (f"r1-{[4, 4, 7, 1, 2][(k - 1) % 5]}",)
    changes = [(second.z[k] != first.z[[4, 4, 7, 1, 2][(k - 1) % 5]]).sum().item() for k in range(1, 28)]
    assert sum(changes) / len(changes) < 3
    mixed = run(seed=1, fresh=4)
    first = mixed.open_round()
    mixed.tell("pick", [0, 1, 2, 3, 4])
    second = mixed.open_round()
    fresh = zip(second.parent_ids[-4:], second.seeds[-4:], strict=True)
    assert all(parents == () and seed > 0 for parents, seed in fresh)
    again = torch.randn(D, generator=torch.Generator().manual_seed(second.seeds[-1]))
    assert torch.equal(second.z[-1], again)  # a fresh draw, regenerable from its seed
    assert all(len(parents) == 1 for parents in second.parent_ids[1:-4])


def test_class_mutation_options_change_the_vector_as_named() -> None:
    for mode in ("coordinates", "row"):
        evolution = run(seed=8, adapt_mutation_rate=False, mutation_rate=1.0, class_mutation=mode)
        first = evolution.open_round()
        evolution.tell("pick", [0, 1, 2, 3, 4])
        second = evolution.open_round()
        rows = evolution.class_rows
        assert rows is not None and first.class_vectors is not None and second.class_vectors is not None
        whole_rows = 0
        for k in range(6, 28):
            vector = second.class_vectors[k]
            assert (vector[None] == rows).any(0).all()  # every coordinate from some row
            whole_rows += int((vector[None] == rows).all(1).any())
        assert whole_rows == 22 if mode == "row" else whole_rows < 22  # "coordinates" mixes rows
    with pytest.raises(ValueError, match="class_mutation"):
        EvolutionConfig(class_mutation="some")  # type: ignore[arg-type]


def test_the_rate_stays_fixed_by_default() -> None:
    evolution = run(seed=2)
    evolution.open_round()
    evolution.tell("pick", [0, 1, 2, 3, 4])
    second = evolution.open_round()
    assert evolution.rate == DEFAULT_MUTATION_RATE and torch.all(second.rates[6:] == DEFAULT_MUTATION_RATE)
    evolution.tell("pick", [6, 7, 8, 9, 10])
    assert evolution.rate == DEFAULT_MUTATION_RATE


def test_a_step_size_sets_the_mutation_rate_and_adaptation_follows_the_picks() -> None:
    evolution = run(seed=2, adapt_mutation_rate=True)
    first = evolution.open_round()
    evolution.tell("pick", [0, 1, 2, 3, 4], step_size=0.5)
    assert evolution.rate == 0.5
    second = evolution.open_round()
    changed = [(second.z[k] != first.z[(k - 6) % 5]).float().mean().item() for k in range(6, 28)]
    assert 0.2 < sum(changed) / len(changed) < 0.8
    rates = second.rates[[6, 7, 8, 9, 10]]  # offspring: each drew its own rate around 0.5
    assert not torch.allclose(rates, torch.full((5,), 0.5))
    evolution.tell("pick", [6, 7, 8, 9, 10])
    assert evolution.rate == pytest.approx(float(torch.exp(torch.log(rates).mean())))  # the picks' rates survive


def test_none_is_good_draws_the_round_again_and_undo_goes_back() -> None:
    evolution = run(seed=4)
    first = evolution.open_round()
    evolution.tell("none_good")
    redrawn = evolution.open_round()
    assert redrawn.number == 2 and not torch.equal(redrawn.z, first.z) and evolution.answered == 0
    evolution.tell("pick", [3, 3, 3, 0, 1])
    bred = evolution.open_round()
    evolution.tell("none_good")  # fresh offspring of the same picks
    again = evolution.open_round()
    assert again.picks_before == bred.picks_before and again.parent_ids[1] == bred.parent_ids[1]
    assert not torch.equal(again.z[1:], bred.z[1:]) and torch.equal(again.z[0], bred.z[0])
    evolution.tell("undo")  # back to the round the picks were made in, shown again under a new number
    back = evolution.open_round()
    assert back.item_ids == redrawn.item_ids and torch.equal(back.z, redrawn.z) and back.number == 5
    assert evolution.answered == 0


def test_the_result_is_the_latest_picks_best_first_and_rounds_end_the_run() -> None:
    evolution = run(seed=5, rounds=2)
    evolution.open_round()
    evolution.tell("pick", [6, 2, 6, 1, 0])
    evolution.open_round()
    assert not evolution.done
    evolution.tell("pick", [9, 9, 3, 2, 1])
    assert evolution.done
    assert [item_id for item_id, _, _ in evolution.picks()] == ["r2-9", "r2-3", "r2-2", "r2-1"]


def test_a_reloaded_run_continues_exactly() -> None:
    whole, resumed = run(seed=6), run(seed=6)
    whole.open_round()
    whole.tell("pick", [0, 1, 2, 3, 4])
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for evolution in (whole, resumed):
        evolution.open_round()
        evolution.tell("pick", [5, 5, 1, 2, 3])
    assert torch.equal(whole.open_round().z, resumed.open_round().z)
    assert torch.equal(whole.open_round().class_vectors, resumed.open_round().class_vectors)  # type: ignore[arg-type]


def test_an_unconditional_generator_evolves_z_alone() -> None:
    evolution = run(rows=False, mu=2, offspring=3, seed=7)
    assert evolution.open_round().class_vectors is None
    evolution.tell("pick", [0, 3])
    assert evolution.open_round().z.shape == (4, D)


@pytest.mark.parametrize(
    ("mu", "offspring", "rate"), [(0, 27, 0.0), (5, 0, 0.0), (29, 27, 0.0), (5, 27, 1.5), (5, 27, float("nan"))]
)
def test_bad_configs_are_refused(mu: int, offspring: int, rate: float) -> None:
    with pytest.raises(ValueError):
        EvolutionConfig(mu=mu, offspring=offspring, mutation_rate=rate)


# --- answer checks of a round with actions --------------------------------------------------------------------------


def _round(actions: tuple[str, ...] = ("none_good", "undo"), step_size: float = 0.1) -> opt.FeedbackRound:
    items = tuple(RoundItem(item_id=f"i{i}", latent=torch.zeros(4)) for i in range(6))
    round_ = Round(
        number=3, answer="choice", items=items, generator="g@1", choose=2, actions=actions, step_size=step_size
    )  # type: ignore[arg-type]
    return round_message(round_, "rid", 0.0)


def _refused(round_: opt.FeedbackRound, choice: opt.Choice) -> str:
    with pytest.raises(ServiceError) as caught:
        check_answer(round_, opt.SubmitFeedbackRequest(choice=choice))
    return str(caught.value)


def test_answers_with_actions_and_step_sizes_are_checked_naming_the_field() -> None:
    round_ = _round()
    assert list(round_.actions) == [opt.CHOICE_ACTION_NONE_GOOD, opt.CHOICE_ACTION_UNDO]
    check_answer(round_, opt.SubmitFeedbackRequest(choice=opt.Choice(indices=[5, 5], step_size=0.3)))
    check_answer(round_, opt.SubmitFeedbackRequest(choice=opt.Choice(action=opt.CHOICE_ACTION_UNDO)))
    assert "choice.indices" in _refused(round_, opt.Choice(indices=[1], action=opt.CHOICE_ACTION_NONE_GOOD))
    assert "choice.indices[1]" in _refused(round_, opt.Choice(indices=[1, 6]))
    assert "choice.indices" in _refused(round_, opt.Choice(indices=[1, 2, 3]))
    assert "choice.step_size" in _refused(round_, opt.Choice(indices=[1, 2], step_size=0.0))
    assert "choice.step_size" in _refused(round_, opt.Choice(indices=[1, 2], step_size=1.5))
    plain = _round(actions=(), step_size=0.0)
    assert "choice.action" in _refused(plain, opt.Choice(action=opt.CHOICE_ACTION_UNDO))
    assert "choice.step_size" in _refused(plain, opt.Choice(indices=[0, 1], step_size=0.5))
