"""What a design tool asks the server before it builds a spec (its job kinds with their options, its optimizers),
through the SDK and the `gansteer kinds` / `gansteer optimizers` commands; and the spec builders' refusal of an
option the kind does not have."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

from gansteer import AsyncClient, Client, InvalidArgument, JobKindInfo, JobOption, OptimizerInfo, Unimplemented, cli
from gansteer.kinds import KINDS
from gansteer.v1 import optimization_pb2, optimization_pb2_grpc

pytestmark = pytest.mark.service

opt = optimization_pb2
TARGET = np.zeros((4, 4, 3), np.uint8)


class Capabilities(optimization_pb2_grpc.OptimizationServiceServicer):
    def ListJobKinds(self, request: Any, context: grpc.ServicerContext) -> Any:
        budget = opt.JobOption(name="budget", type="gansteer.v1.Budget", default_json='{"amount": 300}')
        inversion = opt.JobKindInfo(
            name="inversion",
            description="find latents whose images resemble targets",
            spec_message="gansteer.v1.InversionSpec",
            options=[opt.JobOption(name="targets", type="repeated gansteer.v1.Image"), budget],
        )
        rounds = opt.JobKindInfo(name="interactive_evolution", description="people pick", has_rounds=True)
        return opt.ListJobKindsResponse(kinds=[inversion, rounds])

    def ListOptimizers(self, request: Any, context: grpc.ServicerContext) -> Any:
        return opt.ListOptimizersResponse(
            optimizers=[
                opt.OptimizerInfo(name="adam", gradient=True, description="Adam", default_learning_rate=0.05),
                opt.OptimizerInfo(name="CMA", gradient=False, description="CMA-ES (nevergrad)", default_population=15),
            ]
        )


@pytest.fixture
def target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    optimization_pb2_grpc.add_OptimizationServiceServicer_to_server(Capabilities(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_job_kinds_and_optimizers_come_back_typed(target: str) -> None:
    with Client(target) as client:
        kinds = client.job_kinds()
        optimizers = client.optimizers()
    assert kinds[0] == JobKindInfo(
        name="inversion",
        description="find latents whose images resemble targets",
        has_rounds=False,
        spec_message="gansteer.v1.InversionSpec",
        options=(
            JobOption("targets", "repeated gansteer.v1.Image", ""),
            JobOption("budget", "gansteer.v1.Budget", '{"amount": 300}'),
        ),
    )
    assert kinds[1].has_rounds
    assert optimizers == [
        OptimizerInfo("adam", True, "Adam", default_learning_rate=0.05, default_population=0),
        OptimizerInfo("CMA", False, "CMA-ES (nevergrad)", default_learning_rate=0.0, default_population=15),
    ]

    async def story() -> list[str]:
        async with AsyncClient(target) as client:
            return [kind.name for kind in await client.job_kinds()]

    assert asyncio.run(story()) == ["inversion", "interactive_evolution"]


def test_an_older_server_answers_unimplemented(target: str) -> None:
    with Client(target) as client, pytest.raises(Unimplemented):
        client.interactions("job-1")


def test_the_commands_print_tables_and_json(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kinds", "--target", target]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[0] == "inversion" and "rounds" in table[-1]
    assert table[2].split() == ["budget", "gansteer.v1.Budget", '{"amount":', "300}"]
    assert cli.main(["optimizers", "--target", target, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document[1] == {
        "name": "CMA",
        "gradient": False,
        "description": "CMA-ES (nevergrad)",
        "default_learning_rate": 0.0,
        "default_population": 15,
    }
    assert cli.main(["optimizers", "--target", target]) == 0
    adam, cma = capsys.readouterr().out.splitlines()
    assert adam.split()[:4] == ["adam", "gradient", "lr", "0.05"]
    assert cma.split()[:4] == ["CMA", "gradient-free", "population", "15"]


def test_a_misspelled_option_is_refused_before_any_call() -> None:
    """Two runs that differ by a typo must not look alike: the unknown name and the nearest valid one are named."""
    with Client("127.0.0.1:1", retries=0, timeout=1) as client:
        with pytest.raises(
            TypeError, match=r"invert\(\) got an unexpected keyword argument 'budgett'; did you mean 'budget'\?"
        ):
            client.invert(TARGET, model="scenes-gen", budgett=10)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="'lambda_x'; did you mean 'lambda_s'"):
            client.invert(TARGET, model="scenes-gen", lambda_x=1.0)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="'colour'; valid: backend, budget"):
            client.invert(TARGET, model="scenes-gen", colour="red")  # type: ignore[call-arg]

    async def story() -> None:
        async with AsyncClient("127.0.0.1:1", retries=0, timeout=1) as client:
            await client.invert(TARGET, model="scenes-gen", optimiser="adam")  # type: ignore[call-arg]

    with pytest.raises(TypeError, match="did you mean 'optimizer'"):
        asyncio.run(story())


@pytest.mark.parametrize(
    ("method", "options", "named"),
    [
        ("invert", {"seed": -1}, "seed"),
        ("invert", {"budget": 2.5}, "budget"),
        ("invert", {"restarts": 2**40}, "restarts"),
        ("invert", {"learning_rate": float("nan")}, "learning_rate"),
        ("invert", {"priority": 2**31}, "priority"),
        ("latent_search", {"seed": -3}, "seed"),
        ("evolve", {"mu": 1.5}, "mu"),
    ],
)
def test_a_number_its_field_cannot_hold_is_refused_naming_the_option(
    method: str, options: dict[str, Any], named: str
) -> None:
    """Not protobuf's bare "Value out of range" naming nothing: InvalidArgument with the option's name, no call made."""
    arguments: dict[str, Any] = {"model": "scenes-gen", **options}
    with Client("127.0.0.1:1", retries=0, timeout=1) as client, pytest.raises(InvalidArgument) as refused:
        if method == "invert":
            client.invert(TARGET, **arguments)
        else:
            getattr(client, method)(**arguments)
    assert str(refused.value).startswith(f"{named}: must be")
    assert refused.value.details[0].field == named
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT  # as the server's refusal would carry


def test_every_kind_knows_its_options() -> None:
    inversion = KINDS["inversion"]
    assert {"budget", "optimizer", "criterion", "labels", "idempotency_key"} <= inversion.options
    assert inversion.method == "invert"
