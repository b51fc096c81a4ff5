"""The client side stays a client: `import legion.client` loads neither
docker-py nor litellm; the client's modules import nothing of the agent
machinery, the sandbox layer or the model adapter; and the dashboard uses the
controller only through its API (nothing of `legion.agent` or `legion.server`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "controller" / "legion"


def test_import_legion_client_loads_neither_docker_nor_litellm() -> None:
    code = (
        "import legion.client, sys; "
        "print(sorted(m for m in ('docker', 'litellm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, by its absolute dotted name (a name
    imported from a module counts as ``module.name``: it may be a submodule)."""
    package = ["legion", *path.relative_to(PACKAGE).parent.parts]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _offending(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(
            name
            for name in _imports(path)
            if any(name == f or name.startswith(f"{f}.") for f in forbidden)
        )
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    return found


def test_the_client_modules_import_no_agent_sandbox_or_model_code() -> None:
    client = [PACKAGE / name for name in ("client.py", "_api_codec.py", "_results.py")]
    forbidden = ("legion.agent", "legion._driver", "legion.sandbox", "legion.models")
    assert not _offending(client, (*forbidden, "litellm", "docker"))


def test_the_dashboard_is_a_client_of_the_api() -> None:
    dashboard = sorted((PACKAGE / "dashboard").glob("*.py"))
    assert dashboard
    assert not _offending(dashboard, ("legion.agent", "legion._driver", "legion.server"))
