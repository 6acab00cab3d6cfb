"""server/ imports flow one way: each part imports only parts below it (the order in server/__init__.py)."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[1] / "server"
# lower first; parts of one level do not import each other
LEVELS = [
    {"errors", "settings", "metrics"},
    {"ids"},
    {"stores"},
    {"tasks"},
    {"serving", "training", "auth"},
    {"runtime"},
    {"state"},
    {"api"},
    {"app"},
]
LEVEL = {part: n for n, parts in enumerate(LEVELS) for part in parts}


def _imported(path: Path) -> set[str]:
    """The parts of server/ that the module at `path` imports (at any depth of its code)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        found |= {m.split(".")[1] for m in modules if m.startswith("server.")}
    return found


def test_every_module_belongs_to_a_level() -> None:
    parts = {p.relative_to(SERVER).parts[0].removesuffix(".py") for p in SERVER.rglob("*.py")}
    assert parts - {"__init__"} <= set(LEVEL), sorted(parts - {"__init__"} - set(LEVEL))


def test_imports_flow_one_way() -> None:
    upward = []
    for path in sorted(SERVER.rglob("*.py")):
        part = path.relative_to(SERVER).parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        for other in _imported(path) - {part}:
            if LEVEL[other] >= LEVEL[part]:
                upward.append(f"{path.relative_to(SERVER.parent)} imports server.{other}")
    assert not upward, upward
