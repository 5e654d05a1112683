"""Human NES end to end: `client.human_nes` submits it, a worker subprocess on the real Redis opens pairwise rounds
(x +- Delta on random sides, the pixels stored in the round), two simulated raters answer every pair through the SDK
calls a person's UI makes, the answers reach the interaction log with their provenance, and the tuned generator is
registered as a new version (its lineage naming the answers) that the generation service serves without a restart.
Bad input is refused naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from job_fixtures import DISC, GEN, JobStack, sdk_stack, target_png

from gansteer import Client, InvalidArgument, JobState
from gansteer.simulate_pairwise import PairwisePerson
from gansteer.types import AnswerKind, Round
from gansteer_server.models import ModelRegistry

pytestmark = [pytest.mark.service, pytest.mark.job, pytest.mark.slow]
Services = tuple[Client, JobStack, list[str]]  # the client, the job stack, the three services' addresses
SMALL = {"images": 3, "pairs_per_image": 4, "basis_scenes": 40, "basis_components": 12}


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with sdk_stack(tmp_path_factory.mktemp("human-nes"), timeout=60) as running:
        yield running


def next_round(job: object, after: str = "") -> Round:
    for round in job.rounds():  # type: ignore[attr-defined]
        if round.round_id != after:
            return round  # type: ignore[no-any-return]
    raise AssertionError(f"job ended without another round: {job.status()}")  # type: ignore[attr-defined]


def test_two_raters_tune_the_generator_and_the_new_version_is_served(services: Services) -> None:
    client, stack, _ = services
    raters = [PairwisePerson(client, scorer=DISC, rater_id=f"sim-{i}", seed=i, position_bias=0.3) for i in range(2)]
    job = client.human_nes(
        model=GEN, rounds=2, raters_per_pair=2, learning_rate=1e-2, register_as="tiny-gen-nes", seed=4, **SMALL
    )
    shown: list[Round] = []
    for _ in range(2):
        round = next_round(job, shown[-1].round_id if shown else "")
        assert round.answer is AnswerKind.PAIRWISE and round.answers_required == 2 and round.answer_levels == 5
        assert len(round.pairs) == 12 and len(round.items) == 24 and len(round.images()) == 24
        for rater in raters:
            job.feedback(round, pairwise=rater(round).pairwise, rater=rater.rater_id)
        shown.append(round)
    status = job.wait(timeout=300)
    assert status.state is JobState.SUCCEEDED, status.error

    # Sides were randomised and recorded: each pair shows x + Delta on one side and x - Delta on the other.
    plus_left = [round.items[left].item_id.endswith("+") for round in shown for left, _ in round.pairs]
    assert all(
        round.items[left].item_id.endswith("+") != round.items[right].item_id.endswith("+")
        for round in shown
        for left, right in round.pairs
    )
    assert 0 < sum(plus_left) < len(plus_left)
    # x + Delta and x - Delta differ from each other, symmetric about the same image.
    first = shown[0]
    left, right = (np.asarray(first.images()[i], np.float64) for i in first.pairs[0])
    assert np.abs(left - right).mean() > 1.0

    log = job.interactions()
    assert sorted((entry.round, entry.rater != "") for entry in log) == [(1, True), (1, True), (2, True), (2, True)]
    assert all(len(entry.pairwise or ()) == 12 and len(entry.items) == 24 for entry in log)
    assert len({entry.rater for entry in log}) == 2  # two raters' pseudonyms

    result = job.result()
    assert result.models == ["tiny-gen-nes@1"]
    card = ModelRegistry([stack.registry_root]).card("tiny-gen-nes@1")
    lineage = card.extra["lineage"]
    assert lineage["job_id"] == job.id and lineage["kind"] == "human_nes" and lineage["base"] == f"{GEN}@1"
    assert sorted(lineage["spec"]["answers"]) == sorted(f"{entry.round}:{entry.rater}" for entry in log)

    # Served without a restart: the generation service renders the new version, as the job's result shows it.
    served = client.generate("tiny-gen-nes", latents=result.latents, classes=list(result.class_ids))
    base = client.generate(GEN, latents=result.latents, classes=list(result.class_ids))
    tuned = np.stack([np.asarray(im, np.float64) for im in served.images])
    before = np.stack([np.asarray(im, np.float64) for im in base.images])
    expected = np.stack([np.asarray(im, np.float64) for im in result.images])
    assert np.abs(tuned - expected).max() <= 1.0  # PNG rounding only
    assert np.abs(tuned - before).mean() > 0.5  # the weights moved


def test_an_answer_outside_the_scale_is_refused_naming_the_field(services: Services) -> None:
    client, _, _ = services
    job = client.human_nes(model=GEN, rounds=1, seed=5, register_as="tiny-gen-nes-refused", **SMALL)
    round = next_round(job)
    with pytest.raises(InvalidArgument) as refused:
        job.feedback(round, pairwise=[1.5] + [0.0] * (len(round.pairs) - 1), rater="sim")
    assert refused.value.field == "pairwise.judgements[0].score"
    job.cancel()


def test_bad_specs_are_refused_naming_the_field(services: Services, tmp_path: Path) -> None:
    client, _, _ = services
    for index in range(3):
        (tmp_path / f"{index}.png").write_bytes(target_png(index))
    cases = [
        ({"basis_scenes": 40, "basis_components": 40}, "spec.human_nes.basis_components"),
        ({"sigma": 0.0}, "spec.human_nes.sigma"),
        ({"sigma": -1.0}, "spec.human_nes.sigma"),
        ({"pairs_per_image": -1}, "spec.human_nes.pairs_per_image"),
        ({"basis_folder": tmp_path}, "spec.human_nes.basis_images"),
        ({"basis": "wavelets"}, "spec.human_nes.basis"),
    ]
    for options, field in cases:
        with pytest.raises(InvalidArgument) as refused:
            client.human_nes(model=GEN, **options)  # type: ignore[arg-type]
        assert refused.value.field == field, (options, refused.value)
    with pytest.raises(InvalidArgument) as missing:
        client.human_nes(model=GEN, basis_folder=tmp_path / "absent")
    assert missing.value.field == "basis_folder"


def test_the_cli_tunes_with_a_simulated_person(services: Services, tmp_path: Path) -> None:
    import json

    from gansteer.cli import main

    optimization, generation, scoring = services[2]
    connection = ["--target", optimization, "--generation-target", generation, "--scoring-target", scoring, "-q"]
    nes = ["nes", "--model", GEN, "--images", "2", "--pairs", "3", "--rounds", "2", "--register-as", "tiny-gen-cli"]
    out = tmp_path / "out"
    code = main([*connection, "--json", *nes, "--q", "8", "--simulate", DISC, "--out", str(out)])
    assert code == 0 and (out / "result.json").is_file()
    models = services[0].models("generator")
    assert "tiny-gen-cli@1" in [m.ref for m in models]
    assert json.loads((out / "result.json").read_text())["generator"] == f"{GEN}@1"


def test_the_result_reports_the_iterations_forking_analysis(services: Services) -> None:
    """With a later snapshot G_j, the result holds d1 = |G_i(z) - G_j(z)| and d2 = |G_i,AH(z) - G_j(z)| per fixed
    latent (pixels and features) and the fraction with d2 < d1 (seed 004, section 4.3)."""
    import torch

    from gansteer_server.jobs.backends import LocalBackend
    from gansteer_server.models.lineage import Lineage, register_derived

    client, stack, _ = services
    registry = ModelRegistry([stack.registry_root])
    base = LocalBackend(registry).generator(GEN)
    later = base.trainable_copy()  # type: ignore[attr-defined]
    with torch.no_grad():
        for parameter in later.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    lineage = Lineage(base=f"{GEN}@1", job_id="test-later-snapshot", kind="test", seed=0)
    register_derived(registry, registry.card(GEN), later, lineage, name="tiny-gen-later")

    rater = PairwisePerson(client, scorer=DISC, rater_id="sim-fork")
    job = client.human_nes(
        model=GEN, forking_reference="tiny-gen-later", learning_rate=1e-2, seed=8, register_as="tiny-gen-fork", **SMALL
    )
    status = job.answer_rounds(rater, rater_id=rater.rater_id)
    assert status.state is JobState.SUCCEEDED, status.error
    result = job.result()
    metrics = [dict(m) for m in result.item_metrics]
    names = {"d1_pixels", "d2_pixels", "d1_features", "d2_features"}
    assert len(metrics) == 3 and all(names <= set(m) for m in metrics)
    closer = sum(m["d2_pixels"] < m["d1_pixels"] for m in metrics) / 3
    assert result.forking_closer == pytest.approx(closer)
    # d1 is the distance between the two snapshots' images of the same latents, as the generation service renders them
    shown = client.generate(GEN, latents=result.latents, classes=list(result.class_ids))
    target = client.generate("tiny-gen-later", latents=result.latents, classes=list(result.class_ids))
    for m, a, b in zip(metrics, shown.images, target.images, strict=True):
        pixels = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) / 127.5
        assert np.linalg.norm(pixels) == pytest.approx(m["d1_pixels"], rel=0.02)


def test_a_folder_of_real_images_is_the_basis(services: Services, tmp_path: Path) -> None:
    client, stack, _ = services
    for index in range(12):
        (tmp_path / f"{index:02d}.png").write_bytes(target_png(100 + index))
    with pytest.raises(InvalidArgument) as refused:  # 12 images span at most 11 directions
        client.human_nes(model=GEN, basis_folder=tmp_path, basis_components=12)
    assert refused.value.field == "spec.human_nes.basis_components"
    rater = PairwisePerson(client, scorer=DISC, rater_id="sim-folder")
    job = client.human_nes(
        model=GEN, basis_folder=tmp_path, basis_components=5, images=2, pairs_per_image=2, register_as="tiny-gen-folder"
    )
    status = job.answer_rounds(rater, rater_id=rater.rater_id)
    assert status.state is JobState.SUCCEEDED, status.error
    lineage = ModelRegistry([stack.registry_root]).card("tiny-gen-folder@1").extra["lineage"]
    assert lineage["spec"]["basis_source"] == "images" and lineage["spec"]["basis_components"] == 5
