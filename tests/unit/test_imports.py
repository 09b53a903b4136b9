"""The direction of every import: the library (`pipeline`, not its `commands`) never imports
`stages` or `pipeline.commands`; a stage imports the library only (never another stage or a
command); no modules import each other, directly or around a cycle. Type-checking imports count.

Imports are read from the source (ast), so the test sees function-level and `TYPE_CHECKING`
imports that running the code would not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(path, root): path for package in PACKAGES
            for path in sorted((root / package).rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path], this: str) -> set[str]:
    """The project modules `path` imports: `import a.b`, `from a.b import c` (a.b.c when c is a
    module) and relative imports, wherever they stand in the file."""
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # a name that is a submodule is that module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != this}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imported_modules(path, modules, name) for name, path in modules.items()}


def layer(module: str) -> str:
    if module == "stages" or module.startswith("stages."):
        return "stage"
    return "command" if module.startswith("pipeline.commands") else "library"


def stage_of(module: str) -> str | None:
    """`stages.ppo.update` → `stages.ppo`; the `stages` package itself (the list) → None."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "stages" and len(parts) > 1 else None


def wrong_directions(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer(module) == "library" and layer(target) != "library":
                problems.append(f"library module {module} imports {layer(target)} {target}")
            elif layer(module) == "stage" and layer(target) == "command":
                problems.append(f"stage module {module} imports command {target}")
            elif layer(module) == "stage" and layer(target) == "stage" and \
                    stage_of(target) is not None and stage_of(target) != stage_of(module):
                problems.append(f"stage module {module} imports another stage's {target}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each once (as found by a depth-first search)."""
    found, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_imports_point_down_and_never_around_a_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "stages.ppo.update" in graph  # the scan saw the project
    assert wrong_directions(graph) == []
    assert cycles(graph) == []


# -- the checker itself, on a small tree of deliberately wrong imports -----------------------------
def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


TREE = {
    "pipeline/__init__.py": "",
    "pipeline/registry.py": "",
    "pipeline/commands/__init__.py": "",
    "pipeline/commands/cli.py": "from stages import STAGES\nfrom pipeline import registry\n",
    "stages/__init__.py": "",
    "stages/sft.py": "from pipeline.registry import Run\n",
    "stages/ppo/__init__.py": "from .stage import run\n",
    "stages/ppo/stage.py": "from stages.ppo import update\n",
    "stages/ppo/update.py": "import pipeline.registry\n",
}


@pytest.mark.parametrize(("extra", "problem"), [
    ({"pipeline/registry.py": "from stages.sft import run\n"},
     "library module pipeline.registry imports stage stages.sft"),
    ({"pipeline/registry.py": "def f():\n    from pipeline.commands import cli\n"},
     "library module pipeline.registry imports command pipeline.commands.cli"),
    ({"pipeline/registry.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from stages.ppo.stage import run\n"},
     "library module pipeline.registry imports stage stages.ppo.stage"),
    ({"stages/sft.py": "from stages.ppo.update import x\n"},
     "stage module stages.sft imports another stage's stages.ppo.update"),
    ({"stages/ppo/update.py": "from pipeline.commands.cli import main\n"},
     "stage module stages.ppo.update imports command pipeline.commands.cli"),
])
def test_a_wrong_direction_is_found(tmp_path, extra, problem):
    write_tree(tmp_path, {**TREE, **extra})
    assert wrong_directions(import_graph(tmp_path)) == [problem]


def test_the_tree_without_wrong_imports_passes(tmp_path):
    write_tree(tmp_path, TREE)
    graph = import_graph(tmp_path)
    assert graph["stages.ppo"] == {"stages.ppo.stage"}  # a relative import, resolved
    assert wrong_directions(graph) == [] and cycles(graph) == []


def test_a_cycle_is_found_also_through_a_type_checking_import(tmp_path):
    update = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
              "    from stages.ppo.stage import Config\n")
    write_tree(tmp_path, {**TREE, "stages/ppo/update.py": update})
    assert cycles(import_graph(tmp_path)) == [["stages.ppo.stage", "stages.ppo.update",
                                                "stages.ppo.stage"]]
