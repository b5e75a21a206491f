"""The gateway's modules form layers: no import circle, ``TYPE_CHECKING`` and function-level
imports included (DESIGN: "no module imports one above it"), and the session path's
modules never import the composition root or the server.

Read from the source with ``ast``, so the test sees every import, not just those executed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gateway"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str) -> Iterator[str]:
    """The gateway modules ``name`` imports, wherever the import statement stands."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        yield from (target for target in targets if target in MODULES and target != name)


GRAPH = {name: set(imports(name)) for name in MODULES}


def cycle() -> list[str] | None:
    """One import cycle among the gateway's modules, or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    assert cycle() is None, " -> ".join(cycle() or [])


@pytest.mark.parametrize("name", ["gateway.session", "gateway.registry",
                                  "gateway.housekeeping", "gateway.accounting",
                                  "gateway.relay", "gateway.guard", "gateway.handshake"])
def test_the_session_path_never_reaches_up_to_the_composition_root(name: str) -> None:
    assert not GRAPH[name] & {"gateway.app", "gateway.server", "gateway.cli"}


def test_the_reader_sees_type_checking_imports() -> None:
    # guard against a reader that misses them: gateway.auth.authenticator imports httpx
    # only under TYPE_CHECKING, and gateway.app imports gateway.session at the top
    assert "gateway.session" in GRAPH["gateway.app"]
    assert "gateway.auth.jwt" in GRAPH["gateway.auth.authenticator"]
