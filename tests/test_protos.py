"""The wire protocol: committed stubs are current, importable from the SDK and from the server, and carry tensors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_the_protos() -> None:
    check = subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr


def test_check_names_a_stale_stub(tmp_path: Path) -> None:
    loader = importlib.util.spec_from_file_location("gansteer_generate_protos", REPO / "protos" / "generate.py")
    assert loader is not None and loader.loader is not None
    generate = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(generate)
    generate.generate(tmp_path)
    (tmp_path / "gansteer" / "v1" / "scoring_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "gansteer" / "v1" / "common_pb2.pyi").unlink()
    (tmp_path / "gansteer" / "v1" / "retired_pb2.py").write_text("")
    assert generate.stale_files(tmp_path) == [
        "gansteer/v1/common_pb2.pyi (missing)",
        "gansteer/v1/scoring_pb2.py (differs)",
        "gansteer/v1/retired_pb2.py (no .proto generates it)",
    ]


def test_stubs_import_from_the_sdk_and_the_server() -> None:
    import gansteer.v1.generation_pb2_grpc as sdk_grpc
    from gansteer_server import proto

    assert proto.generation_pb2_grpc is sdk_grpc
    for name in ("GenerationServiceStub", "GenerationServiceServicer", "add_GenerationServiceServicer_to_server"):
        assert hasattr(sdk_grpc, name)
    assert hasattr(proto.scoring_pb2_grpc, "ScoringServiceStub")
    assert hasattr(proto.optimization_pb2_grpc, "OptimizationServiceStub")


def test_a_tensor_survives_the_wire() -> None:
    from gansteer.tensors import from_tensor_proto, to_tensor_proto
    from gansteer.v1 import common_pb2, generation_pb2

    latents = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    request = generation_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name="builtin-generator"),
        latents=to_tensor_proto(latents),
        condition=common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=[1, 2, 3])),
    )
    received = generation_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert received.WhichOneof("latent_source") == "latents"
    np.testing.assert_array_equal(from_tensor_proto(received.latents, field="latents"), latents)


def test_a_job_spec_names_its_kind() -> None:
    from gansteer.v1 import common_pb2, optimization_pb2

    spec = optimization_pb2.JobSpec(
        inversion=optimization_pb2.InversionSpec(
            targets=[common_pb2.Image(png=b"\x89PNG")],
            generator=common_pb2.ModelRef(name="builtin-generator"),
            criterion="l2",
            lambda_l=10.0,
            budget=optimization_pb2.Budget(unit=optimization_pb2.BUDGET_UNIT_ITERATIONS, amount=100),
        ),
        preview_every=10,
    )
    received = optimization_pb2.JobSpec.FromString(spec.SerializeToString())
    assert received.WhichOneof("kind") == "inversion"
    assert received.inversion.HasField("lambda_l") and not received.inversion.HasField("lambda_s")
