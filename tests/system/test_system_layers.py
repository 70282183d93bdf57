"""The house rule for imports: each layer imports only the layers below it,
never one above, and no two modules import each other (directly or round a
loop). Read from the source with `ast`, function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

from repo_paths import REPO

PACKAGE = REPO / "rescue"
# Bottom to top. units/errors are shared by all; download and providers are
# commands beside the stack, under the CLI (and the Python API it calls).
LAYERS = ["units", "errors", "lru", "crc32c", "source", "disk", "volume", "fs", "guest", "extract", "download", "providers",
          "api", "cli", "__main__"]
SHARED = {"units", "errors", "lru", "crc32c"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["rescue", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("rescue"):
                continue
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update([n for n in names if n in known] or [target])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rescue"))
    return {m for m in found if m in known}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "rescue"


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def test_every_module_belongs_to_a_known_layer():
    unknown = sorted({_layer(m) for m in _graph()} - set(LAYERS) - {"rescue"})
    assert not unknown, f"add these to LAYERS in the right place (and to the README's Architecture): {unknown}"


def test_no_layer_imports_a_layer_above_it():
    upward = []
    for module, targets in _graph().items():
        here = _layer(module)
        for target in targets:
            there = _layer(target)
            if here in LAYERS and there in LAYERS and there not in SHARED \
                    and LAYERS.index(there) > LAYERS.index(here):
                upward.append(f"{module} -> {target}")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    cycles: list[str] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports():
    """The walk above must find imports at all (a checker that sees none passes anything)."""
    graph = _graph()
    assert "rescue.source.base" in graph["rescue.fs.base"]
    assert "rescue.guest.snapshot" in graph["rescue.cli"] or any(t.startswith("rescue.guest") for t in graph["rescue.cli"])
