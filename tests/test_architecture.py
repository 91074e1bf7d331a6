"""The layering rules, checked on the source: no import cycles; runtime never imports server;
cuda never imports runtime; the scheduler and the engine<->server contract import no torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.import_graph import build_graph, find_cycle, reachable

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return build_graph(ROOT)


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


@pytest.mark.parametrize(("importer", "forbidden"), [("runtime", "server"), ("cuda", "runtime")])
def test_layers_import_downwards(graph: dict[str, set[str]], importer: str, forbidden: str) -> None:
    bad = sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        if mod.split(".")[0] == importer
        for dep in deps
        if dep.split(".")[0] == forbidden
    )
    assert not bad, f"{importer} must not import {forbidden}: {bad}"


@pytest.mark.parametrize(
    "module",
    [
        "runtime.engine.scheduler",
        "runtime.engine.slots",
        "runtime.engine.api",
        "runtime.engine.args",
    ],
)
def test_torch_free_modules(graph: dict[str, set[str]], module: str) -> None:
    assert module in graph
    assert "torch" not in reachable(graph, module), f"{module} reaches torch"


def test_kernels_do_not_import_the_model(graph: dict[str, set[str]]) -> None:
    for mod in graph:
        if mod.startswith("runtime.kernels"):
            ours = {d for d in reachable(graph, mod) if d.startswith("runtime.")}
            assert all(d.startswith("runtime.kernels") for d in ours), (mod, ours)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_planted_cycle_is_found(tmp_path: Path) -> None:
    """The checker itself: a cycle through a relative and a lazy import is reported."""
    _write(
        tmp_path,
        {
            "runtime/__init__.py": "",
            "runtime/a.py": "from runtime import b\n",
            "runtime/b.py": "def f():\n    from .c import g\n",
            "runtime/c.py": "import runtime.a\nimport torch\n",
            "server/__init__.py": "",
            "cuda/k.py": "import numpy\n",
        },
    )
    g = build_graph(tmp_path)
    assert find_cycle(g) == ["runtime.a", "runtime.b", "runtime.c", "runtime.a"]
    assert "torch" in reachable(g, "runtime.a")
    del g["runtime.c"]  # break it
    assert find_cycle(g) is None
