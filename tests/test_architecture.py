"""The import rules of docs/architecture.md, read from the source with ``ast`` (every import,
function-level ones included)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "lightning_modules", "losses", "samplers", "experiments")
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

#: package (or sub-package) -> project packages and third-party libraries it may not import.
FORBIDDEN = {
    "datamodules": {"lightning_modules", "experiments", "losses", "run"},
    "lightning_modules": {"experiments", "run"},
    "lightning_modules/nets": {"experiments", "run", "lightning"},
    "experiments": {"run"},
}
#: package -> the only non-standard-library modules it may import (besides itself).
ONLY = {"losses": {"torch", "numpy"}, "samplers": {"torch", "numpy"}}


def imports(path: Path) -> list[str]:
    """Absolute module names ``path`` imports, anywhere in the file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def violations(root: Path) -> list[str]:
    """``file: module`` for every import below ``root`` that breaks :data:`FORBIDDEN` or
    :data:`ONLY`."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            rules = [p for p in FORBIDDEN if rel.startswith(p + "/")]
            for name in imports(path):
                top = name.split(".")[0]
                if any(top in FORBIDDEN[p] for p in rules):
                    found.append(f"{rel}: {name}")
                allowed = ONLY.get(package)
                if allowed is not None and top not in allowed | STDLIB | {package}:
                    found.append(f"{rel}: {name}")
    return found


def experiments_graph(root: Path) -> dict[str, set[str]]:
    """``experiments.<module> -> experiments modules it imports``."""
    graph = {}
    for path in sorted((root / "experiments").glob("*.py")):
        mod = f"experiments.{path.stem}"
        deps = set()
        for name in imports(path):
            if name.startswith("experiments.") and name != mod:
                deps.add(".".join(name.split(".")[:2]))
        graph[mod] = deps
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_point_one_way():
    assert violations(ROOT) == []


def test_experiments_modules_import_each_other_without_cycles():
    assert cycle(experiments_graph(ROOT)) is None


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
    return tmp_path


@pytest.mark.parametrize(
    "rel, text, module",
    [
        (
            "datamodules/lip.py",
            "from lightning_modules.parsing import X\n",
            "lightning_modules.parsing",
        ),
        (
            "lightning_modules/parsing.py",
            "def f():\n    import experiments.keys\n",
            "experiments.keys",
        ),
        (
            "lightning_modules/nets/pspnet.py",
            "import lightning.pytorch as pl\n",
            "lightning.pytorch",
        ),
        ("losses/modules.py", "from datamodules.batch import network_batch\n", "datamodules.batch"),
        ("samplers/regional.py", "import scipy.ndimage\n", "scipy.ndimage"),
        ("experiments/keys.py", "from run import run\n", "run"),
    ],
)
def test_a_violating_import_is_reported(tmp_path, rel, text, module):
    root = _tree(tmp_path, {rel: text, "losses/ok.py": "import math\nimport torch\n"})
    assert violations(root) == [f"{rel}: {module}"]


def test_a_cycle_hidden_in_a_function_is_reported(tmp_path):
    root = _tree(
        tmp_path,
        {
            "experiments/a.py": "from experiments.b import g\n",
            "experiments/b.py": "def g():\n    from experiments.a import f\n",
            "experiments/c.py": "from experiments.a import f\n",
        },
    )
    assert cycle(experiments_graph(root)) == ["experiments.a", "experiments.b", "experiments.a"]
