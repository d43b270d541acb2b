"""The import arrows point one way: shared value types, configs and counters below everything,
the model below the data-independent parts, ``parallel`` below ``train``; no cycle anywhere,
between areas (``keyetron.<area>``) or between modules. Imports inside functions count."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"src": "keyetron", "parallel": "keyetron.parallel", "launch": "keyetron.launch"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, prefix in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([prefix, *parts])] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The keyetron modules ``path`` imports (``from a.b import c`` counts ``a.b.c`` if that is a module)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up ``level - 1`` packages
                parents = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m in known and m != name}


def area(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def graph():
    mods = modules()
    return {m: imports(p, m, set(mods)) for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_parallel_imports_nothing_from_train_and_the_model_nothing_from_data():
    g = graph()
    bad = [(m, d) for m, ds in g.items() for d in ds
           if (m.startswith("keyetron.parallel") and d.startswith("keyetron.train"))
           or (m.startswith("keyetron.model") and d.startswith("keyetron.data"))
           or (m.startswith("keyetron.model") and d.startswith("keyetron.parallel"))
           or (m in ("keyetron.batch", "keyetron.positions") and d != "keyetron")]
    assert not bad, bad


def test_no_import_cycle_between_modules_or_areas():
    g = graph()
    assert not cycles(g), cycles(g)
    areas: dict[str, set[str]] = {}
    for m, ds in g.items():
        areas.setdefault(area(m), set()).update(area(d) for d in ds if area(d) != area(m))
    assert not cycles(areas), cycles(areas)


def test_the_graph_is_read():  # the checks above would pass vacuously on an empty graph
    g = graph()
    assert "keyetron.parallel.engine" in g and "keyetron.objectives.base" in g["keyetron.parallel.engine"]
    assert "keyetron.model.keye" in g["keyetron.parallel.parallelize"]
