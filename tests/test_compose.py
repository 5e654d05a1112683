"""docker-compose.yml cannot be run here (no Docker engine), so check what can go wrong without one: every
gansteer service starts with a console script the packages declare, and every variable it sets is a real setting."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from gansteer_server.config import Settings, settings_table

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _declared_scripts() -> set[str]:
    scripts: set[str] = set()
    for project in ("services", "clients/python"):
        data = tomllib.loads((ROOT / project / "pyproject.toml").read_text())
        scripts |= set(data["project"].get("scripts", {}))
    return scripts


def test_compose_names_redis_three_services_and_a_worker() -> None:
    services = _compose()["services"]
    assert {"redis", "generation", "scoring", "optimization", "worker"} <= set(services)


def test_every_gansteer_command_is_a_declared_console_script() -> None:
    scripts = _declared_scripts()
    for name, service in _compose()["services"].items():
        command = service["command"]
        if name == "redis":
            assert command[0] == "redis-server"
            continue
        assert command[0] in scripts, f"service {name!r} runs {command[0]!r}, which no package declares"


def test_every_variable_set_is_a_known_setting_and_parses() -> None:
    known = {doc.variable for doc in settings_table()}
    for name, service in _compose()["services"].items():
        environment = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        unknown = {k for k in environment if k.startswith("GANSTEER_")} - known
        assert not unknown, f"service {name!r} sets unknown variables {sorted(unknown)}"
        resolved = {
            k: v.replace("${GANSTEER_API_KEYS:-}", "").replace("${GANSTEER_AUTH:-off}", "off")
            for k, v in environment.items()
        }
        Settings.from_env(resolved)
