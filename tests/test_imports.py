"""getfast's modules import only downwards, and never in a cycle.

The imports are read from the source with ``ast`` (function-level ones included, and the package mapped from
``kernels/`` as ``getfast.kernels``), so an import hidden in a function to dodge a cycle still counts.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"getfast": ROOT / "getfast", "getfast.kernels": ROOT / "kernels"}

# Lower layers never import higher ones; a module may import its own layer (without cycles).
LAYERS = [
    ("utilities and kernels", ("getfast", "getfast.io", "getfast.options", "getfast._C", "getfast.ops",
                               "getfast.kernels", "getfast.deq", "getfast.cards",
                               "getfast.embedded", "getfast.limits", "getfast.weights", "getfast.presets")),
    ("models, diffusion, data", ("getfast.models", "getfast.diffusion", "getfast.data")),
    ("training", ("getfast.train",)),
    ("methods, teachers, sampling, metrics", ("getfast.methods", "getfast.teacher", "getfast.importers",
                                              "getfast.sampling", "getfast.metrics")),
    ("entry points", ("getfast.cli", "getfast.demo", "getfast.bench")),
]

# Edges allowed to break the rules, each waiting for a change in a file another engineer owns (none today).
KNOWN_EXCEPTIONS: set = set()


def _module_files():
    out = {}
    for pkg, folder in PACKAGES.items():
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*.py")):
            if "__pycache__" in f.parts or any(p.startswith(".") for p in f.relative_to(folder).parts):
                continue
            rel = f.relative_to(folder).with_suffix("").parts
            if pkg == "getfast" and rel[0] == "kernels":
                continue  # the dev-tree copy, if any, is the same package as kernels/
            name = ".".join((pkg, *rel))
            if name.endswith(".__init__"):
                name = name[: -len(".__init__")]
            out[name] = f
    return out


MODULES = _module_files()


def _resolve(importer: str, is_pkg: bool, node) -> list[str]:
    """The getfast modules an import statement names (``from X import Y``: X.Y when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("getfast")]
    if node.level:
        base = importer.split(".")
        base = base if is_pkg else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    if not mod.startswith("getfast"):
        return []
    targets = []
    for a in node.names:
        sub = f"{mod}.{a.name}"
        targets.append(sub if sub in MODULES else mod)
    return targets


def _nearest_module(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, f in MODULES.items():
        tree = ast.parse(f.read_text(), filename=str(f))
        is_pkg = f.name == "__init__.py"
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _resolve(name, is_pkg, node):
                    t = _nearest_module(t) or t
                    if t != name:
                        edges.add(t)
        graph[name] = edges
    return graph


def layer_of(name: str) -> int | None:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            # the package itself ("getfast") places only its __init__, not every module under it
            if (name == p or (p != "getfast" and name.startswith(p + "."))) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_modules_are_found():
    assert {"getfast.cli", "getfast.io", "getfast.sampling", "getfast.train.loop", "getfast.metrics.fid"} <= set(MODULES)


def test_every_layer_name_is_a_module():
    """A name in LAYERS that matches no module (renamed, deleted) would silently place nothing."""
    native = {"getfast._C"}  # the compiled extension: no .py file
    stale = sorted(p for _, prefixes in LAYERS for p in prefixes
                   if p not in native and not any(m == p or m.startswith(p + ".") for m in MODULES))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_imports_only_look_down():
    graph = import_graph()
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            ls, ld = layer_of(src), layer_of(dst)
            if ls is None or ld is None or ld <= ls or (src, dst) in KNOWN_EXCEPTIONS:
                continue
            bad.append(f"{src} ({LAYERS[ls][0]}) imports {dst} ({LAYERS[ld][0]})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = import_graph()
    pruned = {s: {d for d in t if (s, d) not in KNOWN_EXCEPTIONS} for s, t in graph.items()}
    cycles = _cycles(pruned)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_known_exceptions_are_still_needed():
    """An exception whose edge is gone must be deleted from the list (so the list only shrinks)."""
    graph = import_graph()
    stale = sorted(e for e in KNOWN_EXCEPTIONS if e[1] not in graph.get(e[0], ()))
    assert not stale, f"remove from KNOWN_EXCEPTIONS: {stale}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    tree = ast.parse("def f():\n    from getfast.cli import main\n\nfrom . import io\n")
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found = [t for n in nodes for t in _resolve("getfast.data.pairs", False, n)]
    assert {_nearest_module(t) or t for t in found} == {"getfast.cli", "getfast.data"}, found
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


@pytest.mark.parametrize("name", ["getfast.data.pairs", "getfast.metrics.fid",
                                  "getfast.data.datasets"])
def test_named_back_edges_are_gone(name):
    """Data never imports the teacher or training; metrics never import training."""
    graph = import_graph()
    assert not {t for t in graph[name] if t.startswith(("getfast.train", "getfast.teacher"))}, graph[name]
