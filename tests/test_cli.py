"""The `gansteer` command as scripts use it: real subprocesses, `--json` on stdout, and the documented exit codes.

`gansteer up` itself is under test: it runs as a subprocess that starts its own `redis-server` on a free port (so no
key of the shared Redis is touched), and every other command talks to it.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gansteer import tensors

pytestmark = [pytest.mark.service, pytest.mark.job, pytest.mark.slow]

GANSTEER = [sys.executable, "-m", "gansteer.cli"]
ENV = {**os.environ, "GANSTEER_TORCH_THREADS": "1", "GANSTEER_LOG_LEVEL": "WARNING"}


def gansteer(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GANSTEER, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout):
        raise TimeoutError(f"no output within {timeout} s")
    return process.stdout.readline()


@pytest.fixture(scope="module")
def up() -> Iterator[dict[str, Any]]:
    """`gansteer up --any-port --json` in the background; yields its addresses; Ctrl-C at the end must stop it."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on the PATH")
    # Its log (a JSON line per call) goes to a file: a pipe nobody reads fills and blocks the whole stack.
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [*GANSTEER, "up", "--any-port", "--json", "--transport", "redis-server"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=ENV,
        )
        try:
            stack = json.loads(read_line(process, 90))
            stack["args"] = [
                f"--target={stack['optimization']}",
                f"--generation-target={stack['generation']}",
                f"--scoring-target={stack['scoring']}",
            ]
            yield stack
            process.send_signal(signal.SIGINT)
            assert process.wait(60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_usage_errors_exit_2() -> None:
    assert gansteer("--help").returncode == 0
    assert gansteer().returncode == 2
    assert gansteer("invert").returncode == 2
    assert gansteer("jobs", "frobnicate").returncode == 2


def test_unreachable_service_exits_5() -> None:
    done = gansteer("--target=127.0.0.1:1", "--generation-target=127.0.0.1:1", "--timeout=2", "models", "--json")
    assert done.returncode == 5
    assert json.loads(done.stdout)["error"]["type"] == "Unavailable"


def test_out_of_range_numbers_are_one_line_errors_naming_the_option(tmp_path: Path) -> None:
    target = tmp_path / "target.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)
    for option, value in (("--seed", "-1"), ("--restarts", str(2**40))):
        refused = gansteer("--target=127.0.0.1:1", "invert", str(target), option, value)  # refused before any call
        assert refused.returncode == 3, refused.stderr
        assert refused.stderr.startswith(f"gansteer: {option[2:]}: must be an integer")
        assert len(refused.stderr.strip().splitlines()) == 1


def test_up_at_a_redis_that_does_not_answer_says_so_in_one_line() -> None:
    refused = gansteer("up", "--any-port", "--redis-url", "redis://127.0.0.1:1/0", timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        line for line in refused.stderr.strip().splitlines() if line.startswith("gansteer up: cannot reach Redis")
    ]


def test_up_models_generate(up: dict[str, Any], tmp_path: Path) -> None:
    assert "redis-server" in up["transport"]
    with urllib.request.urlopen(f"{up['web']}healthz", timeout=10) as page:  # the rounds page is up too
        assert json.loads(page.read()) == {"ok": True}
    listed = gansteer(*up["args"], "models", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "scenes-gen" in {m["name"] for m in json.loads(listed.stdout)}
    made = gansteer(*up["args"], "generate", "scenes-gen", "-n", "2", "--out", str(tmp_path), "--json")
    assert made.returncode == 0, made.stderr
    document = json.loads(made.stdout)
    assert len(document["images"]) == 2 and all(Path(p).is_file() for p in document["images"])
    assert Path(document["grid"]).is_file()
    # no --seed: new images each run, and the seed printed brings them back
    again = json.loads(
        gansteer(*up["args"], "generate", "scenes-gen", "-n", "2", "--out", str(tmp_path / "b"), "--json").stdout
    )
    assert again["seed"] != document["seed"]
    same = gansteer(
        *up["args"], "generate", "scenes-gen", "-n", "2", "--seed", str(document["seed"]), "--out", str(tmp_path / "c")
    )
    assert same.returncode == 0 and same.stdout.splitlines()[-1] == f"seed {document['seed']}"
    assert np.array_equal(np.load(tmp_path / "c" / "latents.npy"), np.load(Path(document["latents"])))


def test_kinds_and_optimizers_say_what_the_server_runs(up: dict[str, Any]) -> None:
    kinds = gansteer(*up["args"], "kinds", "--json")
    assert kinds.returncode == 0, kinds.stderr
    inversion = {kind["name"]: kind for kind in json.loads(kinds.stdout)}["inversion"]
    assert inversion["spec_message"] == "gansteer.v1.InversionSpec" and not inversion["has_rounds"]
    assert "budget" in {option["name"] for option in inversion["options"]}
    optimizers = gansteer(*up["args"], "optimizers")
    assert optimizers.returncode == 0, optimizers.stderr
    rows = {line.split()[0]: line.split()[1] for line in optimizers.stdout.splitlines()}
    assert rows["adam"] == "gradient" and rows["CMA"] == "gradient-free"


def test_invert_then_jobs_commands(up: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "target.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(target)
    out = tmp_path / "out"
    inverted = gansteer(
        *up["args"],
        "invert",
        str(target),
        "--discriminator",
        "scenes-disc",
        "--budget",
        "8",
        "--out",
        str(out),
        "--json",
    )
    assert inverted.returncode == 0, inverted.stderr
    document = json.loads(inverted.stdout)
    job_id = document["job_id"]
    assert Path(document["files"]["grid"]).is_file() and (out / "result_0.png").is_file()
    assert document["items"][0]["psnr"] > 0

    listed = gansteer(*up["args"], "jobs", "list", "--json")
    assert job_id in [job["id"] for job in json.loads(listed.stdout)]
    watched = gansteer(*up["args"], "jobs", "watch", job_id, "--json")
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert watched.returncode == 0 and lines[-1]["state"] == "succeeded"
    # `jobs watch --json | head -0`: the reader is gone before the first line; the command ends quietly
    piped = subprocess.Popen(
        [*GANSTEER, *up["args"], "jobs", "watch", job_id, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert piped.stdout is not None and piped.stderr is not None
    piped.stdout.close()
    assert piped.wait(60) == 0
    assert "Error" not in piped.stderr.read()
    fetched = gansteer(*up["args"], "jobs", "result", job_id, "--out", str(tmp_path / "again"), "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "again" / "target_0.png").is_file()  # the targets come back from the job's spec
    # without --out a result is saved all the same, under out/JOB_ID
    here = tmp_path / "cwd"
    here.mkdir()
    default = gansteer(*up["args"], "invert", str(target), "--budget", "4", "--json", cwd=here)
    assert default.returncode == 0, default.stderr
    assert (here / "out" / json.loads(default.stdout)["job_id"] / "result_0.png").is_file()


def test_refusals_map_to_exit_codes(up: dict[str, Any], tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(tensors.png_encode(np.zeros((8, 8, 3), np.uint8))[:30])
    refused = gansteer(*up["args"], "invert", str(broken), "--criterion", "l2", "--json")
    assert refused.returncode == 3
    error = json.loads(refused.stdout)["error"]
    assert error["type"] == "InvalidArgument" and error["details"][0]["field"].startswith("spec.inversion.targets[0]")
    assert gansteer(*up["args"], "invert", str(tmp_path / "missing.png")).returncode == 3
    assert gansteer(*up["args"], "jobs", "result", "0" * 24).returncode == 4
    assert gansteer(*up["args"], "generate", "no-such-model", "--out", str(tmp_path)).returncode == 4


def test_am_arguments_and_refusals(up: dict[str, Any]) -> None:
    """`gansteer am` needs exactly one target; the SDK's checks and the server's refusals exit 3 in one line (or one
    JSON document) naming the field."""
    assert gansteer("am", "scenes-gen").returncode == 2  # neither --class nor --new-label
    assert gansteer("am", "scenes-gen", "--class", "forest", "--new-label", "dusk").returncode == 2
    assert gansteer("am", "scenes-gen", "--class", "forest", "--init", "original").returncode == 2
    checked = gansteer(*up["args"], "am", "scenes-gen", "--class", "forest", "--trials", "-1")
    assert checked.returncode == 3 and checked.stderr.splitlines() == [
        "gansteer: trials: must be a whole number >= 0 (0: the server's default), got -1"
    ]
    refusals = {
        "target_class": ["--class", "glacier"],
        "judge": ["--class", "forest", "--classifier", "scenes-clf", "--judge", "scenes-clf"],
        "init": ["--new-label", "dusk", "--classifier", "scenes-clf-alt", "--init", "target"],
        "diversity_space": ["--class", "forest", "--diversity-weight", "2"],
    }
    for field, arguments in refusals.items():
        refused = gansteer(*up["args"], "am", "scenes-gen", *arguments, "--dry-run", "--json")
        assert refused.returncode == 3, (field, refused.stdout, refused.stderr)
        error = json.loads(refused.stdout)["error"]
        assert error["type"] == "InvalidArgument"
        assert error["details"][0]["field"] in (f"spec.embedding_am.{field}", field)


def test_ctrl_c_cancels_the_submitted_job(up: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "target.png"
    Image.new("RGB", (32, 32), "navy").save(target)
    invert = subprocess.Popen(
        [*GANSTEER, *up["args"], "invert", str(target), "--criterion", "l2", "--budget", "50000", "-q"],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert invert.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(invert.stderr, selectors.EVENT_READ)
    assert selector.select(60), "no job submitted"
    job_id = invert.stderr.readline().split()[-1]  # "submitted job <id>"
    # Interrupt a job that is running (cancelling a queued one would prove less), waiting on its state, not a clock.
    deadline = time.monotonic() + 120
    while (status := json.loads(gansteer(*up["args"], "jobs", "status", job_id, "--json").stdout))["step"] < 1:
        assert time.monotonic() < deadline, "the job never started running"
    assert status["state"] == "running"
    invert.send_signal(signal.SIGINT)
    assert invert.wait(120) == 130  # a bound for a loaded machine; it exits as soon as the cancel is through
    assert f"cancelled job {job_id}" in invert.stderr.read()
    started = time.monotonic()
    final = gansteer(*up["args"], "jobs", "watch", job_id, "--json")
    assert final.returncode == 6 and json.loads(final.stdout.splitlines()[-1])["state"] == "cancelled"
    assert time.monotonic() - started < 30
    again = gansteer(*up["args"], "jobs", "cancel", job_id, "--json")  # a finished job: nothing changes
    assert again.returncode == 0 and json.loads(again.stdout)["state"] == "cancelled"
    # it keeps the best result it found: saved as a finished job's, while the exit code says it was cancelled
    for extra in (["--no-wait"], []):
        out = tmp_path / f"kept{len(extra)}"
        kept = gansteer(*up["args"], "jobs", "result", job_id, "--out", str(out), "--json", *extra)
        assert kept.returncode == 6, kept.stderr
        assert json.loads(kept.stdout)["state"] == "cancelled" and (out / "result_0.png").is_file()


def test_search_with_each_of_the_seeds_optimizers_and_basincma_inversion(up: dict[str, Any], tmp_path: Path) -> None:
    budgets = {"adam": "12", "cmaes": "60", "ga": "64"}
    for optimizer, budget in budgets.items():
        out = tmp_path / optimizer
        searched = gansteer(
            *up["args"],
            "search",
            "--class",
            "mountains",
            "--class",
            "3",
            "--optimizer",
            optimizer,
            *(["--option", "sigma=0.7"] if optimizer == "cmaes" else []),
            "--budget",
            budget,
            "--perturbations",
            "20",
            "--out",
            str(out),
            "--json",
        )
        assert searched.returncode == 0, searched.stderr
        document = json.loads(searched.stdout)
        assert [item["class_id"] for item in document["items"]] == [0, 3]
        assert {"objective", "robustness", "judge_prob", "realism"} <= set(document["items"][0])
        assert document["metrics"]["generator_calls"] <= int(budget) and (out / "grid.png").is_file()

    refused = gansteer(*up["args"], "search", "--class", "0", "--optimizer", "cmaes", "--option", "sigma=0", "--json")
    assert refused.returncode == 3
    assert json.loads(refused.stdout)["error"]["details"][0]["field"] == "spec.latent_search.optimizer.options.sigma"
    assert gansteer(*up["args"], "search", "--class", "12").returncode == 3

    target = tmp_path / "target.png"
    Image.new("RGB", (32, 32), "teal").save(target)
    basin = gansteer(
        *up["args"],
        "invert",
        str(target),
        "--optimizer",
        "basincma",
        "--budget",
        "320",
        "--budget-unit",
        "generator_calls",
        "--json",
    )
    assert basin.returncode == 0, basin.stderr
    # two BasinCMA steps (8 candidates x 10 Adam steps each) until 70% is left, then 160 Adam steps from the best
    assert json.loads(basin.stdout)["metrics"]["generator_calls"] == 320
