"""The rules of the house (docs: README "Layout"), read from the package's import graph.

Every `glmv_jax/**.py` is parsed with ast; imports anywhere in a module count (inside functions too), and
so do "glmv_jax.x:Name" strings (a class loaded by name is an import all the same). The checks: no import
circle between modules, no import in a forbidden direction, and the leaves import only what they may.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "glmv_jax"

REFERENCE = re.compile(r"glmv_jax(\.\w+)+:\w+")  # "glmv_jax.module:Name", an import by name

# area (first component under glmv_jax) -> areas it must not import
FORBIDDEN = {
    "config": {"model", "ops", "sharding", "data", "generate", "checkpoint", "train", "rl", "cli", "demo"},
    "model": {"generate", "train", "rl", "cli", "demo"},
    "data": {"model", "ops", "generate", "train", "rl", "cli", "demo"},
    "generate": {"train", "rl", "cli", "demo"},
    "checkpoint": {"generate", "train", "rl", "cli", "demo"},
    "train": {"rl", "cli", "demo"},
    "rl": {"cli", "demo"},
}
# leaves: area -> the only areas of the package they may import
LEAVES = {
    "errors": set(),
    "shapes": set(),
    "sharding": {"config", "errors"},
    "ops": {"sharding", "config", "errors"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every glmv_jax module name `path` imports (absolute or relative, at any depth of the file)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and REFERENCE.fullmatch(node.value):
            found.add(node.value.split(":")[0])
    return {name for name in found if name.startswith("glmv_jax.")}


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a `from a.b import name` of a function counts as a.b)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        deps = set()
        for name in imports_of(path):
            while name not in files and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in files and name not in (module, "glmv_jax"):
                deps.add(name)
        graph[module] = deps
    return graph


def area(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        mine = area(module)
        for dep in sorted(deps):
            theirs = area(dep)
            if theirs == mine:
                continue
            if mine in LEAVES and theirs not in LEAVES[mine]:
                bad.append(f"{module} -> {dep} (a leaf)")
            elif theirs in FORBIDDEN.get(mine, ()):
                bad.append(f"{module} -> {dep}")
    return bad


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_no_forbidden_import():
    assert forbidden_imports(import_graph()) == []


def test_the_checks_can_fail():
    """The checks find a circle and forbidden imports in a graph made to have them."""
    graph = {"glmv_jax.model.a": {"glmv_jax.train.b"}, "glmv_jax.train.b": {"glmv_jax.model.a"},
             "glmv_jax.sharding": {"glmv_jax.model.a"}, "glmv_jax.ops.c": {"glmv_jax.sharding"}}
    assert circles(graph) == [["glmv_jax.model.a", "glmv_jax.train.b"]]
    assert forbidden_imports(graph) == ["glmv_jax.model.a -> glmv_jax.train.b",
                                        "glmv_jax.sharding -> glmv_jax.model.a (a leaf)"]


@pytest.mark.parametrize("path", sorted((PACKAGE / "rl" / "rewards").rglob("*.py")), ids=lambda p: p.name)
def test_reward_modules_import_no_jax(path):
    """The reward code runs in worker processes that must start fast: no jax, flax or model code."""
    heavy = {name for name in _all_imports(path) if name.split(".")[0] in ("jax", "flax", "optax", "torch")}
    outside = {name for name in imports_of(path) if not name.startswith(("glmv_jax.rl.rewards", "glmv_jax.errors"))}
    assert not heavy and not outside


def _all_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names
