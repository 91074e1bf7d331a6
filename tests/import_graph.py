"""The import graph of our packages, read from the source with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("server", "runtime", "cuda")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(root: Path, path: Path) -> set[str]:
    """Every module `path` imports, at any depth in the file (lazy imports count too)."""
    module = module_name(root, path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            found.add(target)
            # `from pkg import mod` imports the submodule pkg.mod when there is one
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def build_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports (third-party names kept as they are)."""
    files = [p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))]
    ours = {module_name(root, p) for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        deps = set()
        for name in imports_of(root, p):
            if name in ours:
                deps.add(name)
            elif name.split(".")[0] not in packages:
                deps.add(name.split(".")[0])  # third party: its top-level name
        mod = module_name(root, p)
        # a package's own __init__ runs before its submodules: importing an ancestor is no cycle
        graph[mod] = {d for d in deps if d != mod and not mod.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among our modules, as a path that ends where it starts; None if acyclic."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module (ours and third-party top-level names) `start` imports, transitively."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen
