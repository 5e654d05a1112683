"""Server settings from GANSTEER_* variables: one-machine defaults, every variable documented, bad values named."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from gansteer_server.config import BUILTIN_REGISTRY, ConfigError, Settings, settings_markdown, settings_table


def test_defaults_work_on_one_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.registry_paths == (tmp_path.resolve() / "var" / "registry", BUILTIN_REGISTRY)
    assert settings.writable_registry == tmp_path.resolve() / "var" / "registry"
    assert (settings.generation_port, settings.scoring_port, settings.optimization_port) == (50051, 50052, 50053)
    assert settings.service_address("scoring") == "127.0.0.1:50052"
    assert (settings.max_batch, settings.max_delay_ms, settings.max_queue) == (64, 5.0, 1024)
    assert settings.max_message_bytes == 64 * 1024 * 1024
    assert settings.api_keys == () and settings.auth_disabled
    assert settings.backend == "local" and settings.torch_threads == 0


def test_variables_override_defaults(tmp_path: Path) -> None:
    env = {
        "GANSTEER_REDIS_URL": "redis://cache:6380/2",
        "GANSTEER_REGISTRY": os.pathsep.join([str(tmp_path / "mine"), str(tmp_path / "shared")]),
        "GANSTEER_HOST": "0.0.0.0",
        "GANSTEER_GENERATION_PORT": "0",
        "GANSTEER_SCORING_ADDRESS": "scoring:50052",
        "GANSTEER_API_KEYS": " alice-key, bob-key ,",
        "GANSTEER_MAX_BATCH": "16",
        "GANSTEER_MAX_DELAY_MS": "2.5",
        "GANSTEER_BACKEND": "Remote",
        "GANSTEER_ONNX_MODELS": "builtin-classifier,builtin-generator@2",
        "GANSTEER_JOB_RESULT_TTL_S": "60",
        "GANSTEER_MAX_QUEUE": "",  # empty means unset
    }
    settings = Settings.from_env(env)
    assert settings.redis_url == "redis://cache:6380/2"
    assert settings.registry_paths == (tmp_path / "mine", tmp_path / "shared", BUILTIN_REGISTRY)
    assert settings.generation_port == 0
    assert settings.service_address("generation") == "127.0.0.1:0"
    assert settings.service_address("scoring") == "scoring:50052"
    assert settings.api_keys == ("alice-key", "bob-key") and settings.auth_enabled
    assert (settings.max_batch, settings.max_delay_ms, settings.max_queue) == (16, 2.5, 1024)
    assert settings.backend == "remote"
    assert settings.onnx_models == ("builtin-classifier", "builtin-generator@2")
    assert settings.job_result_ttl_s == 60


def test_builtin_zoo_is_searched_last_and_once(tmp_path: Path) -> None:
    env = {"GANSTEER_REGISTRY": os.pathsep.join([str(BUILTIN_REGISTRY), str(tmp_path)])}
    assert Settings.from_env(env).registry_paths == (tmp_path, BUILTIN_REGISTRY)


@pytest.mark.parametrize(
    ("env", "auth_disabled"),
    [
        ({}, True),
        ({"GANSTEER_API_KEYS": "k"}, False),
        ({"GANSTEER_API_KEYS": "k", "GANSTEER_AUTH": "off"}, True),
        ({"GANSTEER_API_KEYS": "k", "GANSTEER_AUTH": "on"}, False),
        ({"GANSTEER_HOST": "0.0.0.0", "GANSTEER_AUTH": "off"}, True),
        ({"GANSTEER_HOST": "::1"}, True),
    ],
)
def test_auth_is_on_with_keys_and_off_only_when_safe_or_explicit(env: dict[str, str], auth_disabled: bool) -> None:
    assert Settings.from_env(env).auth_disabled is auth_disabled


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GANSTEER_HOST": "0.0.0.0"}, "GANSTEER_AUTH: the services would listen on 0.0.0.0 with no GANSTEER_API_KEYS"),
        ({"GANSTEER_AUTH": "on"}, "GANSTEER_AUTH=on: needs at least one key"),
        ({"GANSTEER_AUTH": "maybe"}, "GANSTEER_AUTH=maybe: expected on or off"),
        ({"GANSTEER_SCORING_PORT": "70000"}, "GANSTEER_SCORING_PORT=70000: expected an integer from 0 to 65535"),
        ({"GANSTEER_MAX_BATCH": "many"}, "GANSTEER_MAX_BATCH=many: expected an integer"),
        ({"GANSTEER_MAX_BATCH": "0"}, "GANSTEER_MAX_BATCH=0: expected an integer from 1 up"),
        ({"GANSTEER_MAX_DELAY_MS": "-1"}, "GANSTEER_MAX_DELAY_MS=-1: expected a finite number"),
        ({"GANSTEER_MAX_DELAY_MS": "nan"}, "GANSTEER_MAX_DELAY_MS=nan: expected a finite number"),
        ({"GANSTEER_BACKEND": "gpu"}, "GANSTEER_BACKEND=gpu: expected local or remote"),
        ({"GANSTEER_REDIS_URL": "localhost:6379"}, "GANSTEER_REDIS_URL=localhost:6379: expected a redis://"),
        ({"GANSTEER_REGISTRY": os.pathsep}, "GANSTEER_REGISTRY=.*: expected at least one folder"),
        ({"GANSTEER_GENERATION_ADDRESS": "generation"}, "GANSTEER_GENERATION_ADDRESS=generation: expected host:port"),
        ({"GANSTEER_LOG_LEVEL": "loud"}, "GANSTEER_LOG_LEVEL=loud: expected one of DEBUG"),
    ],
)
def test_bad_values_raise_config_error_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_unknown_variables_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    Settings.from_env({"GANSTEER_REDIS_UR": "redis://elsewhere", "PATH": "/bin"})
    assert "GANSTEER_REDIS_UR" in caplog.text and "PATH" not in caplog.text


def test_every_setting_is_documented_once() -> None:
    table = settings_table()
    variables = [row.variable for row in table]
    assert len(variables) == len(set(variables)) == len(dataclasses.fields(Settings))
    assert all(row.variable.startswith("GANSTEER_") and row.meaning for row in table)
    defaults = Settings.from_env({row.variable: row.default for row in table if row.variable != "GANSTEER_AUTH"})
    assert defaults == Settings()
    markdown = settings_markdown()
    assert all(f"`{variable}`" in markdown for variable in variables)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().max_batch = 1  # type: ignore[misc]


def test_job_variables_reach_the_job_settings() -> None:
    from gansteer_server.jobs.settings import JobSettings

    settings = Settings.from_env({"GANSTEER_JOB_SEGMENT_STEPS": "17", "GANSTEER_JOB_MAX_BUDGET": "500"})
    jobs = JobSettings.create(settings)
    assert (jobs.segment_steps, jobs.max_budget) == (17, 500)
    assert JobSettings.create(settings, segment_steps=3).segment_steps == 3  # an explicit override wins


def test_segments_longer_than_a_third_of_the_visibility_timeout_are_refused() -> None:
    from gansteer_server.jobs.settings import JobSettings

    settings = Settings.from_env({"GANSTEER_JOB_SEGMENT_SECONDS": "300", "GANSTEER_BROKER_VISIBILITY_TIMEOUT_S": "600"})
    with pytest.raises(ValueError, match="visibility_timeout_s"):
        JobSettings.create(settings)
