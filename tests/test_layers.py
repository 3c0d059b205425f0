"""The tree shows the architecture (docs/architecture.md): layers, no import cycles, no upward
imports, at most 8 modules directly in vlmhub/, and the public import paths plugins use.

Imports are read from the source with ``ast`` (function-level imports included; imports under
``if TYPE_CHECKING:`` are typing only and left out), so a cycle broken by a late import is
still found.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlmhub"

# Lowest first. A module may import from its own layer and the layers below it, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("vlmhub.spec", "vlmhub.errors", "vlmhub.logs", "vlmhub.paths", "vlmhub.engine_log")),
    ("sizing", ("vlmhub.sizing",)),
    ("config", ("vlmhub.config",)),
    ("engines", ("vlmhub.engines",)),
    ("scheduling", ("vlmhub.scheduling",)),
    ("control", ("vlmhub.control",)),
    ("edges", ("vlmhub.router", "vlmhub.ocr", "vlmhub.web", "vlmhub.testing")),
    ("cli", ("vlmhub.cli", "vlmhub.__main__")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    if module == "vlmhub":
        return 0
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every vlmhub module ``path`` imports at run time (any depth, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vlmhub"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("vlmhub"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(me)
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) for name, path in files.items()}


def test_no_import_cycle_anywhere() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            dfs(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_from_a_layer_above_it() -> None:
    upward = [
        f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
        for src, targets in sorted(graph().items())
        for dst in sorted(targets)
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_scheduling_layer_is_pure() -> None:
    """No I/O and no clock in the pure decisions: the clock is passed in."""
    banned = {"asyncio", "socket", "subprocess", "httpx", "aiohttp", "docker", "time", "os"}
    offenders = []
    for path in (PACKAGE / "scheduling").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module.split(".")[0]]
            offenders += [f"{path.name}: {n}" for n in names if n in banned]
    assert not offenders, offenders


def test_at_most_eight_modules_directly_in_vlmhub() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


@pytest.mark.parametrize(
    "path, names",
    [
        ("vlmhub.spec", ("ModelSpec", "PromptPreset", "VllmOptions", "VramModel", "Floors")),
        ("vlmhub.ocr.layout", ("layout_to_markdown",)),
        ("vlmhub.testing", ()),
        ("vlmhub.testing.pytest_plugin", ()),
        ("vlmhub.testing.fixtures", ()),
    ],
)
def test_public_import_paths_for_plugins_keep_working(path: str, names: tuple[str, ...]) -> None:
    module = importlib.import_module(path)
    for name in names:
        assert hasattr(module, name), f"{path}.{name} is gone: plugins import it"
