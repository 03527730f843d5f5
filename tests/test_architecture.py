"""Structural rules of the code base: import layering and test docstrings."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lower layers first. A module may import its own layer and any layer below it, never above.
# Modules not listed are above every listed layer (e.g. agent.cli, agent.app).
LAYERS: list[set[str]] = [
    {
        "agent.errors",
        "agent.protocol",
        "agent.settings",
        "agent.config_sources",
        "agent.config_template",
    },
    {"agent.logs"},
    {
        "agent.runtimes",
        "agent.transfer",
        "agent.archive",
        "agent.hardware",
        "agent.health",
        "agent.nvml",
        "agent.metrics",
        "agent.contribution",
        "agent.sync",
    },
    {"agent.policy", "agent.community", "agent.tasks"},
    {"agent.control"},
    {
        "agent.observe",
        "agent.systemd",
        "agent.lifecycle",
        "agent.app",
        "agent.doctor",
        "agent.login",
        "agent.models_cli",
        "agent.status_cli",
        "agent.config_cli",
    },
    {"agent.cli", "agent.__main__"},
]
# What each package must never import, whatever the layers say.
FORBIDDEN: dict[str, set[str]] = {
    "agent.protocol": {"asyncio", "websockets", "httpx", "socket", "time", "agent.settings"},
    "agent.runtimes": {"agent.control", "agent.protocol"},
    "gateway": {"agent"},  # except the allowances below
}
GATEWAY_MAY_IMPORT = (
    "agent.protocol",
    "agent.runtimes.comfyui",
    "agent.runtimes.base",
    "agent.logs",
)


def module_name(path: Path) -> str:
    """Return the dotted module name of a source file under the repository root."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Return every module a file imports (absolute names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def layer_of(name: str) -> int | None:
    """Return the layer index of a module, or None when it is outside the agent package."""
    if not belongs(name, "agent"):
        return None
    if name in {"agent", "agent.__version__", "agent.PROG"}:
        return 0  # the package root holds only the version and the command's name
    for index, layer in enumerate(LAYERS):
        if any(name == top or name.startswith(top + ".") for top in layer):
            return index
    return len(LAYERS)


def belongs(name: str, package: str) -> bool:
    """Return whether module ``name`` is ``package`` or inside it."""
    return name == package or name.startswith(package + ".")


def source_files(package: str) -> list[Path]:
    """Return the Python files of a top-level package (empty if it does not exist yet)."""
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


def test_agent_imports_only_downward() -> None:
    """No agent module imports a module of a higher layer (architecture.md)."""
    violations = []
    for path in source_files("agent"):
        me = module_name(path)
        mine = layer_of(me)
        assert mine is not None
        for imported in imports_of(path):
            theirs = layer_of(imported)
            same_package = imported.split(".")[:2] == me.split(".")[:2]
            if theirs is not None and theirs > mine and not same_package:
                violations.append(f"{me} (layer {mine}) imports {imported} (layer {theirs})")
    assert violations == []


def test_forbidden_imports_are_absent() -> None:
    """Protocol stays sans-I/O, runtimes stay below control, the gateway uses only allowed parts."""
    violations = []
    for package, banned in FORBIDDEN.items():
        for path in source_files(package.split(".")[0]):
            me = module_name(path)
            if not belongs(me, package):
                continue
            for imported in imports_of(path):
                if package == "gateway" and imported.startswith(GATEWAY_MAY_IMPORT):
                    continue
                if any(belongs(imported, bad) for bad in banned):
                    violations.append(f"{me} imports {imported}")
    assert violations == []


def test_layering_check_catches_a_violation(tmp_path: Path) -> None:
    """The import walker sees a forbidden import (the check above can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom agent.control import connection\n", encoding="utf-8")
    assert {"asyncio", "agent.control", "agent.control.connection"} <= imports_of(bad)
    assert layer_of("agent.control.connection") == 4
    assert layer_of("agent.protocol.session") == 0


def test_every_test_has_a_one_line_docstring() -> None:
    """Each test function states, in one line, the behaviour it proves."""
    missing = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
                "test"
            ):
                doc = ast.get_docstring(node)
                if not doc or "\n" in doc.strip():
                    missing.append(f"{path.relative_to(ROOT)}::{node.name}")
    assert missing == []
