"""PIR end to end on the tiny registry: impressions through the API, an estimator job that collects simulated
interactions and registers two estimators the scoring service serves, and a tuning job whose generator version the
generation service serves at once (seed 000)."""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from job_fixtures import CLF, GEN, JobStack, OptimizationStub, make_settings

from gansteer import Client, cli
from gansteer.errors import InvalidArgument, NotFound
from gansteer_server.models import ModelRegistry
from gansteer_server.servers.app import start_generation_server, start_scoring_server

pytestmark = [pytest.mark.job]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[JobStack, OptimizationStub]]:
    stack = JobStack(tmp_path_factory.mktemp("pir"))
    try:
        yield stack, stack.start_server()[1]
    finally:
        stack.close()


def _address(stack: JobStack) -> str:
    return stack.servers[0].address


def _row(seed: int, impressions: int = 100, interactions: int = 7, **extra: object) -> dict[str, object]:
    return {"generator": GEN, "seed": seed, "class_id": seed % 4, "impressions": impressions,
            "interactions": interactions} | extra  # fmt: skip


def test_impressions_are_appended_with_provenance_and_exported(stack: tuple[JobStack, OptimizationStub]) -> None:
    table = f"t-{uuid.uuid4().hex[:8]}"
    with Client(_address(stack[0])) as client:
        recorded, total, duplicate = client.report_impressions(
            table, [_row(1), _row(2, image_id="hero-2", cohort="eu")], idempotency_key="batch-1"
        )
        assert (recorded, total, duplicate) == (2, 2, False)
        assert client.report_impressions(table, [_row(1)], idempotency_key="batch-1") == (0, 2, True)
        assert client.report_impressions(table, [_row(3, latent=[0.5] * 16)])[:2] == (1, 3)
        rows = client.impressions(table, page_size=2)  # two pages
    assert [row["seed"] for row in rows] == [1, 2, 3]
    assert rows[0]["generator"] == f"{GEN}@1"  # the version is pinned on receipt
    assert rows[1]["image_id"] == "hero-2" and rows[1]["cohort"] == "eu"
    assert all(row["source"] == "api" and row["reporter"] and row["received_at"] for row in rows)
    assert rows[2]["latent"] == [0.5] * 16 and rows[0]["interactions"] / rows[0]["impressions"] == 0.07


@pytest.mark.parametrize(
    ("row", "error", "field"),
    [
        (_row(1, impressions=5, interactions=6), InvalidArgument, "records[1].interactions"),
        (_row(1, impressions=-1, interactions=0), InvalidArgument, "records[1].impressions"),
        (_row(1, interactions=-2), InvalidArgument, "records[1].interactions"),
        (_row(1, generator=f"{GEN}@9"), NotFound, "records[1].generator"),
        (_row(1, class_id=99), InvalidArgument, "records[1].class_id"),
        (_row(1, latent=[0.0] * 3), InvalidArgument, "records[1].latent.shape"),
    ],
)
def test_a_bad_record_refuses_the_request_naming_its_field(
    stack: tuple[JobStack, OptimizationStub], row: dict[str, object], error: type[Exception], field: str
) -> None:
    table = f"bad-{uuid.uuid4().hex[:8]}"
    with Client(_address(stack[0])) as client:
        with pytest.raises(error) as refused:
            client.report_impressions(table, [_row(0), row])
        assert refused.value.field == field  # type: ignore[attr-defined]
        with pytest.raises(NotFound):  # nothing of the refused request was stored
            client.impressions(table)


@pytest.mark.slow
def test_estimator_and_tuning_jobs_publish_models_the_services_serve(stack: tuple[JobStack, OptimizationStub]) -> None:
    job_stack = stack[0]
    job_stack.start_worker()
    settings = make_settings(job_stack.registry_root)
    scoring = start_scoring_server(settings, port=0, metrics_port=0)
    generation = start_generation_server(settings, port=0, metrics_port=0)
    table = f"sim-{uuid.uuid4().hex[:8]}"
    try:
        with Client(
            _address(job_stack), scoring_target=scoring.address, generation_target=generation.address
        ) as client:
            estimator_job = client.pir_estimator(
                dataset=table,
                simulate_generator=GEN,
                simulate_objective={"output": "colour_single", "params": {"colour": "blue"}},
                simulate_images=80,
                simulate_impressions=500,
                backbone=CLF,
                bins=10,
                epochs=2,
                register_as="pir-test",
            )
            estimator_job.wait(progress=False, timeout=300)
            main, check = estimator_job.result().models
            assert main.startswith("pir-test@") and check.startswith("pir-test-check@")
            rows = client.impressions(table)
            assert len(rows) == 80 and {row["source"] for row in rows} == {f"job:{estimator_job.id}"}
            assert all(0 <= row["interactions"] <= 500 for row in rows)

            images = client.generate(GEN, 4, seed=3, classes=[0, 1, 2, 3])
            served = client.score(images.images, main, "pir")["pir"]
            assert served.shape == (4,) and np.all((served >= 0) & (served <= 1))

            tuning = client.pir_tuning(
                model=GEN,
                estimator=main,
                steps=4,
                batch_size=4,
                check_every=2,
                eval_images=16,
                objective={"output": "colour_single", "params": {"colour": "blue"}},
                register_as="tiny-gen-pir",
            )
            tuning.wait(progress=False, timeout=300)
            tuned = tuning.result()
            [version] = tuned.models
            assert version.startswith("tiny-gen-pir@") and 0 <= tuned.metrics["p_value"] <= 1
            after = client.generate(version, 4, seed=3, classes=[0, 1, 2, 3])
            assert after.images[0].size == images.images[0].size  # served without a restart
        card = ModelRegistry(settings.registry_paths).card(version)
        lineage = card.extra["lineage"]
        assert lineage["base"] == f"{GEN}@1" and lineage["job_id"] == tuning.id and lineage["kind"] == "pir_tuning"
        assert lineage["spec"]["estimator"] == main and lineage["spec"]["guards"]["check_estimator"] == check
        assert lineage["spec"]["dataset"] == table and lineage["spec"]["guards"]["enabled"] is True
    finally:
        scoring.stop(grace=None)
        generation.stop(grace=None)


def test_the_cli_reports_a_csv_and_exports_the_table(
    stack: tuple[JobStack, OptimizationStub], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = f"cli-{uuid.uuid4().hex[:8]}"
    rows = tmp_path / "rows.csv"
    rows.write_text(f"generator,seed,class_id,impressions,interactions\n{GEN},4,1,1000,120\n{GEN},5,2,1000,0\n")
    target = ["--target", _address(stack[0])]
    assert cli.main([*target, "--json", "impressions", "report", table, str(rows)]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 2
    out = tmp_path / "export.csv"
    assert cli.main([*target, "impressions", "export", table, "--out", str(out)]) == 0
    exported = list(csv.DictReader(out.open()))
    assert [(r["seed"], r["interactions"], r["source"]) for r in exported] == [("4", "120", "api"), ("5", "0", "api")]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"generator,seed,class_id,impressions,interactions\n{GEN},4,1,10,11\n")
    assert cli.main([*target, "impressions", "report", table, str(bad)]) == 3  # invalid argument
    assert "records[0].interactions" in capsys.readouterr().err
