"""The README is the front door: its two commands and its configuration table must stay true."""

from __future__ import annotations

from pathlib import Path

from gansteer_server.config import settings_markdown

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_shows_the_two_commands_verbatim() -> None:
    assert "```\nmake demo\n```" in README
    assert "```\nmake test\n```" in README


def test_readme_settings_table_matches_the_code() -> None:
    table = README.split("<!-- settings:start -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert table.strip() == settings_markdown().strip(), "regenerate the table from gansteer_server.config"
