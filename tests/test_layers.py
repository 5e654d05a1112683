"""The layers of ARCHITECTURE decision 13, read from the imports: servers translate gRPC, jobs never import them,
and what both need lives below them (wire/, models/, algorithms/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "services" / "gansteer_server"
# layer -> packages of gansteer_server it must not import
FORBIDDEN = {
    "jobs": ("servers",),
    "wire": ("servers", "jobs"),
    "models": ("servers", "jobs", "wire"),
    "algorithms": ("servers", "jobs", "wire"),
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_from_the_layers_above_it(layer: str) -> None:
    offending = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module in imported_modules(path):
            if any(module.startswith(f"gansteer_server.{above}") for above in FORBIDDEN[layer]):
                offending.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not offending, "\n".join(offending)
