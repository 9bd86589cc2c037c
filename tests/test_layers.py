"""The house: every module's imports (inside functions too) obey the layer rules, with no circle and no import
back up; maths modules hold no state and touch no files. Read with ``ast``, nothing is imported."""
from __future__ import annotations

import ast
import os

import pytest

from tests.helpers import ROOT

PACKAGE = "lawa_diffusion"
PACKAGE_DIR = os.path.join(ROOT, PACKAGE)

# layer -> the layers it may import (besides itself). "door" = the modules at the package root and cli/.
ALLOWED = {
    "door": {"cli", "integrations", "training", "posthoc", "reports", "evaluation", "engine", "maths", "runs",
             "config", "utils"},
    "cli": {"integrations", "training", "posthoc", "reports", "evaluation", "engine", "maths", "runs", "config",
            "utils"},
    "integrations": {"training", "reports", "engine", "maths", "runs", "config", "utils"},
    "training": {"evaluation", "engine", "reports", "maths", "runs", "config", "utils"},
    "posthoc": {"evaluation", "engine", "maths", "runs", "config", "utils"},
    "reports": {"maths", "runs", "config", "utils"},
    "evaluation": {"maths", "config", "utils"},
    "engine": {"maths", "runs", "config", "utils"},
    "maths": {"config"},
    "runs": {"config", "utils"},
    "config": set(),
    "utils": set(),
}
# `__init__` is the public face: config and engine only (the rest lazily, by name, through the same rule)
FACE_ALLOWED = {"config", "engine"}
# what a maths module may import: numerics only
MATHS_IMPORTS_OK = {"__future__", "math", "typing", "dataclasses", "functools", "re", "numpy", "torch", "collections",
                    "itertools", "json", "torch_fidelity", "torchmetrics", "scipy"}
FILE_CALLS = {"open", "makedirs", "remove", "rename", "replace", "listdir", "save", "load", "save_file", "load_file"}


def modules() -> dict:
    """module name -> file path, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2 and parts[1] in ALLOWED and parts[1] != "door":  # a layer's face (__init__)
        return parts[1]
    if len(parts) <= 2:
        return "door"
    return parts[1]


def imports_of(path: str, known: dict) -> list:
    """(line, imported module) of every import of a package module in ``path``, at any depth."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            for a in node.names:  # `from lawa_diffusion.maths import lag` imports the module maths.lag
                sub = f"{node.module}.{a.name}"
                found.append((node.lineno, sub if sub in known else node.module))
    return found


def graph() -> dict:
    known = modules()
    return {m: imports_of(p, known) for m, p in known.items()}


def violations(edges: dict) -> list:
    bad = []
    for module, imported in edges.items():
        mine = layer_of(module)
        for line, other in imported:
            theirs = layer_of(other)
            if other == PACKAGE:  # `from lawa_diffusion import __version__`: only the doors may
                ok = mine in ("door", "cli")
            elif module == PACKAGE:
                ok = theirs in FACE_ALLOWED
            else:
                ok = theirs == mine or theirs in ALLOWED[mine]
            if not ok:
                bad.append(f"{module}:{line} imports {other}: the {mine} layer may import only "
                           f"{', '.join(sorted(ALLOWED[mine])) or 'nothing else in the package'}")
    return bad


def cycles(edges: dict) -> list:
    """Import circles between modules (Tarjan's strongly connected components of size > 1)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for _, w in edges.get(v, []):
            if w not in edges or w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_every_import_obeys_the_layer_rules():
    bad = violations(graph())
    assert not bad, "imports a layer may not make:\n" + "\n".join(bad)


def test_no_import_circle():
    found = cycles(graph())
    assert not found, f"import circles: {found}"


def test_a_forbidden_import_is_caught(tmp_path):
    # the rule check itself: posthoc importing training, evaluation importing engine and reports importing
    # evaluation are each reported with the pair and the rule
    edges = {"lawa_diffusion.posthoc.search": [(3, "lawa_diffusion.training.tracks")],
             "lawa_diffusion.evaluation.fid": [(5, "lawa_diffusion.engine.lawa")],
             "lawa_diffusion.reports.run_report": [(7, "lawa_diffusion.evaluation.fid")],
             "lawa_diffusion.engine.lawa": [(9, "lawa_diffusion.maths.averaging")]}
    bad = violations(edges)
    assert len(bad) == 3
    assert bad[0].startswith("lawa_diffusion.posthoc.search:3 imports lawa_diffusion.training.tracks: the posthoc")
    assert cycles({"a": [(1, "b")], "b": [(1, "a")], "c": [(1, "a")]}) == [["a", "b"]]


def test_every_module_sits_in_a_layer():
    for module in modules():
        assert layer_of(module) in ALLOWED, module


@pytest.mark.parametrize("module", sorted(m for m in modules() if layer_of(m) == "maths" and "." in m[15:]))
def test_maths_holds_no_state_and_touches_no_files(module):
    path = modules()[module]
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not (
                isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                assert name.split(".")[0] in MATHS_IMPORTS_OK, f"{module}:{node.lineno} imports {name}"
        if isinstance(node, ast.Global):
            raise AssertionError(f"{module}:{node.lineno}: global state")
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            assert name not in FILE_CALLS, f"{module}:{node.lineno} calls {name}: maths touches no files"
    for node in tree.body:  # module-level names are constants: no dict/list/set a function could fill
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.Dict, ast.List, ast.Set)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            assert all(n.isupper() for n in names), f"{module}:{node.lineno}: mutable module state {names}"
