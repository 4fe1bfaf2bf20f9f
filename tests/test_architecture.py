"""The house's layout: which module may import which (every import of the repo's own modules, at the
top or inside a function), with no circles and no import running back up: the parts never import
eval.py, train.py, timing.py or a tool, and no tool imports another. README.md's drawing shows the
same layers. Each check is a function of a graph, so the tests also show that it can fail.
"""
from __future__ import annotations

import ast
import functools
import glob
import os
import subprocess
import sys

import pytest

import train
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layers, lowest first: a module imports only modules of lower layers, or (among the parts only)
# parts that do not import it back.
LAYERS = {
    "parts": ("precision", "numerics", "tracking", "lease", "models", "data", "autoattack_eval", "utils", "methods",
              "cost", "config", "rundir"),
    "evaluation": ("eval",),
    "trainer": ("train",),
    "tool kit": ("timing",),
    "tools": ("bench", "authors_compare", "gpu_check", "report", "launch", "analysis", "sweep_cost", "sweep"),
}
# Which module may import which: the table every import must keep to.
ALLOWED = {
    "precision": set(), "numerics": set(), "tracking": set(), "lease": set(), "models": set(), "data": set(),
    "autoattack_eval": set(),
    "utils": {"precision"},
    "methods": {"utils"},
    "cost": {"data", "methods"},
    "config": {"cost", "methods", "utils", "data", "models", "autoattack_eval", "tracking"},
    "rundir": {"config", "lease"},
    "eval": {"autoattack_eval", "config", "data", "models", "numerics", "precision", "rundir", "utils"},
    "train": {"config", "cost", "data", "eval", "lease", "methods", "models", "numerics", "precision", "rundir",
              "tracking", "utils"},
    "timing": {"config", "data", "methods", "models", "precision", "train"},
    "bench": {"autoattack_eval", "config", "data", "models", "precision", "rundir", "timing", "train", "utils"},
    "authors_compare": {"config", "data", "eval", "models", "precision", "rundir", "timing", "train", "utils"},
    "gpu_check": {"config", "data", "methods", "models", "precision", "rundir", "timing", "train", "utils"},
    "report": {"config", "methods", "numerics", "rundir"},
    "launch": {"config", "lease", "rundir"},
    "analysis": {"data", "models", "rundir", "utils"},
    "sweep_cost": {"config", "cost"},
    "sweep": {"config", "methods"},
}


def repo_modules() -> list[str]:
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


def imports_of(source: str, modules: set[str]) -> dict[str, set[str]]:
    """{imported repo module: the names of the functions it is imported in ("" for module level)}."""
    found: dict[str, set[str]] = {}

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name.split(".")[0] for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            for name in names:
                if name in modules:
                    found.setdefault(name, set()).add(where)
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not where else where
            visit(child, inner)
    visit(ast.parse(source), "")
    return found


@functools.cache
def graph() -> dict[str, dict[str, set[str]]]:
    modules = set(repo_modules())
    return {m: imports_of(open(os.path.join(ROOT, f"{m}.py")).read(), modules) for m in modules}


def problems(edges: dict[str, dict[str, set[str]]], allowed: dict[str, set[str]], layers: dict[str, tuple]
             ) -> list[str]:
    """Every way the import graph breaks the table or the layers; [] when it keeps them."""
    layer = {m: i for i, members in enumerate(layers.values()) for m in members}
    parts = set(next(iter(layers.values())))
    found = [f"{m} is in no layer" for m in edges if m not in layer] + [
        f"{m} is in no row of the table" for m in edges if m not in allowed]
    for m, targets in edges.items():
        for t in targets:
            if t not in allowed.get(m, set()):
                found.append(f"{m} imports {t}, which the table does not allow")
    for m, targets in allowed.items():
        for t in targets:
            if m in layer and t in layer and layer[t] > layer[m]:
                found.append(f"{m} -> {t} runs back up")
            elif m in layer and t in layer and layer[t] == layer[m] and m not in parts:
                found.append(f"{m} -> {t} joins two modules of one layer above the parts")
    found += [f"circle: {' -> '.join(c)}" for c in circles(allowed)]
    return found


def circles(allowed: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of the table (depth-first search; each reported once, from where it was found)."""
    seen, stack, out = set(), [], []

    def walk(m: str) -> None:
        if m in stack:
            out.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(allowed.get(m, ())):
            walk(t)
        stack.pop()
    for m in sorted(allowed):
        walk(m)
    return out


def test_every_import_keeps_to_the_table_and_the_layers():
    edges = graph()
    assert set(edges) == set(ALLOWED), "a new module needs a row in ALLOWED and a place in LAYERS"
    assert problems(edges, ALLOWED, LAYERS) == []


def test_gpu_check_and_the_parts_import_no_tool():
    edges = graph()
    assert "bench" not in edges["gpu_check"]
    tools = set(LAYERS["tools"]) | {"train", "eval", "timing"}
    assert {m: sorted(set(edges[m]) & tools) for m in LAYERS["parts"] if set(edges[m]) & tools} == {}
    assert {m: sorted(set(edges[m]) & set(LAYERS["tools"])) for m in LAYERS["tools"]
            if set(edges[m]) & set(LAYERS["tools"])} == {}


def test_the_checks_fail_on_what_they_guard_against():
    layers = {"parts": ("a", "b"), "tools": ("t", "u")}
    allowed = {"a": set(), "b": {"a"}, "t": {"a", "b"}, "u": {"a"}}
    fine = {"a": {}, "b": {"a": {""}}, "t": {"a": {""}, "b": {"main"}}, "u": {}}
    assert problems(fine, allowed, layers) == []
    assert problems({**fine, "u": {"b": {""}}}, allowed, layers) == [
        "u imports b, which the table does not allow"]
    assert problems(fine, {**allowed, "a": {"t"}}, layers) == [
        "a -> t runs back up", "circle: a -> t -> a", "circle: a -> t -> b -> a"]
    assert problems(fine, {**allowed, "u": {"t"}}, layers) == ["u -> t joins two modules of one layer above "
                                                                       "the parts"]
    assert problems(fine, {**allowed, "a": {"b"}}, layers) == ["circle: a -> b -> a"]
    assert problems({**fine, "a": {"t": {"__getattr__"}}}, allowed, layers) == [  # inside a function too
        "a imports t, which the table does not allow"]
    source = "import os\nimport a\n\ndef f():\n    from b import x\n    def g():\n        import t\n"
    assert imports_of(source, {"a", "b", "t"}) == {"a": {""}, "b": {"f"}, "t": {"f"}}


def drawing_layers(readme: str) -> dict[str, set[str]]:
    """README.md's drawing of the house: {layer: the modules its lines name}."""
    block = readme.split("Imports run downward only", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    found: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        head = next((name for name in LAYERS if line.startswith(name + " ")), None)
        current = head or current
        found.setdefault(current, set()).update(w.removesuffix(".py") for w in line.replace(",", " ").split()
                                                if w.strip("();").endswith(".py") for w in [w.strip("();")])
    return found


def test_the_readme_drawing_shows_every_module_in_its_layer():
    drawn = drawing_layers(open(os.path.join(ROOT, "README.md")).read())
    assert {layer: drawn.get(layer, set()) for layer in LAYERS} == {layer: set(m) for layer, m in LAYERS.items()}


def test_what_moved_above_its_old_home_is_named_there_in_one_line():
    with pytest.raises(AttributeError, match=r"utils.lr_at is train.lr_at now"):
        _ = utils.lr_at
    assert callable(train.lr_at)
    old = subprocess.run([sys.executable, os.path.join(ROOT, "methods.py"), "flags", "fgsm", "--eps", "8"],
                         capture_output=True, text=True)
    assert (old.returncode, old.stdout) == (2, "")
    assert old.stderr == "methods.py: error: its commands are sweep.py's now: python sweep.py flags fgsm --eps 8\n"
