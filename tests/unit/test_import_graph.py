"""The package picture in ARCHITECTURE.md, checked from the source: every import (top level,
inside functions, under ``TYPE_CHECKING``) read with ``ast``, and the graph refused when it has a
cycle, an import that goes up a layer, torch outside the trainer, or an entry alias that someone
imports. The checker is tested on a small fixture tree first, so a pass on the real tree means
something."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS = {"core": 0, "config": 1, "guild": 2, "daemon": 3, "trainer": 4, "cli": 5}
"""Foundation first; a package may import its own modules and those of lower layers only."""

HEAVY = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "tensorboard")
"""Libraries only the trainer (the training child) may import: the daemon and the command line
stay light."""

WEB = ("starlette", "uvicorn")
"""Libraries only the dashboard (``cli.dashboard``, run by ``realm serve``) may import."""

ALIASES = {"core.cli", "core.training_daemon", "guild.campaigns.cli"}
"""The design card's module forms: thin entry points that hand over to ``cli``. Nothing may
import them, so they can never close a cycle."""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}"


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The project module an imported name lives in (``core.job.Job`` -> ``core.job``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def import_graph(root: Path) -> tuple[list[Edge], list[Edge]]:
    """(project edges, third-party edges) of every module under the layered packages."""
    known = modules(root)
    project, external = [], []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, name, path.name == "__init__.py")
                targets = [f"{base}.{a.name}" for a in node.names] if base else []
                targets = [t if _owner(t, known) else base for t in targets]
            else:
                continue
            for target in targets:
                owner = _owner(target, known)
                if owner and owner != name:
                    project.append(Edge(name, owner, node.lineno))
                elif not owner and target.split(".")[0] not in LAYERS:
                    external.append(Edge(name, target.split(".")[0], node.lineno))
    return project, external


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on_stack, found = [], set(), []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def violations(root: Path) -> list[str]:
    project, external = import_graph(root)
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(project)]
    for e in project:
        if e.target in ALIASES:
            problems.append(f"{e}: an entry alias is a leaf; import cli.main instead")
        elif e.source in ALIASES:
            if not e.target.startswith("cli"):
                problems.append(f"{e}: an entry alias may only hand over to cli")
        elif LAYERS[e.target.split(".")[0]] > LAYERS[e.source.split(".")[0]]:
            problems.append(f"{e}: goes up a layer ({e.source.split('.')[0]} -> "
                            f"{e.target.split('.')[0]})")
    problems += [f"{e}: {e.target} is only for the trainer" for e in external
                 if e.target in HEAVY and not e.source.startswith("trainer")]
    problems += [f"{e}: {e.target} is only for the dashboard" for e in external
                 if e.target in WEB and not e.source.startswith("cli.dashboard")]
    return problems


# --- the checker on a fixture tree ----------------------------------------------------------

def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "core/__init__.py": "", "core/errors.py": "class E(Exception): ...\n",
    "core/job.py": "from core.errors import E\n",
    "config/__init__.py": "", "config/schema.py": "from core import errors\n",
    "daemon/__init__.py": "", "daemon/loop.py": "import psutil\nfrom config.schema import x\n",
    "trainer/__init__.py": "", "trainer/engine.py": "import torch\nfrom daemon.loop import y\n",
    "cli/__init__.py": "", "cli/main.py": "def main():\n    from trainer.engine import z\n",
    "core/cli.py": "def main():\n    from cli.main import main\n",
}


def test_checker_passes_a_clean_fixture(tmp_path):
    assert violations(_tree(tmp_path, CLEAN)) == []


@pytest.mark.parametrize("rel, text, expected", [
    ("core/job.py", "from core.paths import p\n", "import cycle: core.job <-> core.paths"),
    ("core/job.py", "def f():\n    from cli.main import main\n", "goes up a layer (core -> cli)"),
    ("config/schema.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                         "    from trainer.engine import T\n", "goes up a layer (config -> trainer)"),
    ("daemon/loop.py", "from trainer import engine\n", "goes up a layer (daemon -> trainer)"),
    ("config/schema.py", "def f():\n    import torch\n", "torch is only for the trainer"),
    ("cli/main.py", "import transformers\n", "transformers is only for the trainer"),
    ("daemon/loop.py", "from starlette.applications import S\n",
     "starlette is only for the dashboard"),
    ("cli/main.py", "from core.cli import main\n", "an entry alias is a leaf"),
    ("core/cli.py", "from core.job import x\n", "an entry alias may only hand over to cli"),
    ("daemon/loop.py", "from . import helper\n", "import cycle: daemon.helper <-> daemon.loop"),
])
def test_checker_catches_each_kind_of_bad_import(tmp_path, rel, text, expected):
    files = {**CLEAN, rel: text, "core/paths.py": "from core.job import Job\n",
             "daemon/helper.py": "from daemon.loop import x\n"}
    found = violations(_tree(tmp_path, files))
    assert any(expected in v for v in found), found


def test_checker_resolves_relative_and_package_imports(tmp_path):
    root = _tree(tmp_path, {**CLEAN, "guild/__init__.py": "",
                            "guild/heroes/__init__.py": "from ..campaigns import c\n",
                            "guild/campaigns/__init__.py": "from guild.heroes import h\n"})
    project, _ = import_graph(root)
    assert Edge("guild.heroes", "guild.campaigns", 1) in project
    assert cycles(project) == [["guild.campaigns", "guild.heroes"]]


# --- the real tree -------------------------------------------------------------------------

def test_realm_import_graph_is_layered_and_acyclic():
    project, _ = import_graph(ROOT)
    assert len(project) > 100, "the walk found the project's imports"
    assert violations(ROOT) == []


def test_the_module_forms_are_entry_aliases_that_exist():
    known = modules(ROOT)
    assert ALIASES <= set(known)
    for alias in ALIASES:
        text = known[alias].read_text()
        assert "from cli.main import main" in text and 'if __name__ == "__main__":' in text
