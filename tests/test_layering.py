"""Imports flow one way: cli -> commands -> predict/engine -> machine/model -> core. A test reads
every module's imports (ast, function-level ones included, since hiding an import in a function
does not remove the dependency) and fails on an upward import or a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import cputune

PACKAGE = Path(cputune.__file__).parent

# The layers, lowest first. A module may import its own layer (without a cycle) and those below.
LAYERS = {
    "core": {"errors", "checks", "units", "data", "fsutil", "jsonio", "sysfs", "stats", "cores",
             "numa_policy", "launch"},
    "machine/model": {"topology", "hwloc_xml", "memory", "bandwidth", "peak", "pagecache", "findings",
                      "probe", "gguf_model", "remote", "quant_rules", "recipes", "architectures", "catalog", "synth", "modelfiles",
                      "resolve", "quality"},
    "predict/engine": {"predictor", "hardware", "profile_machine", "box", "calibrate", "published", "selector", "candidates",
                       "build", "binding", "engine_args", "llama_bench", "placement", "bench", "tune",
                       "serve", "rpc"},
    "commands": {"report", "report_file", "plots"},
    "cli": {"cli", "__main__", "__init__"},
}
RANK = {m: i for i, (_, mods) in enumerate(LAYERS.items()) for m in mods}
NAMES = list(LAYERS)


def imports_of(path: Path) -> set[str]:
    """The cputune modules `path` imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cputune":
            parts = node.module.split(".")
            out |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cputune.")}
    return out


def graph() -> dict[str, set[str]]:
    mods = {p.stem for p in PACKAGE.glob("*.py")} | {p.stem.split(".")[0] for p in PACKAGE.glob("_*.so")}
    return {p.stem: {m for m in imports_of(p) if m in mods and m != p.stem} for p in PACKAGE.glob("*.py")}


def test_every_module_has_a_layer():
    missing = sorted(set(graph()) - set(RANK))
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_no_upward_import():
    bad = [f"{m} ({NAMES[RANK[m]]}) imports {d} ({NAMES[RANK[d]]})"
           for m, deps in graph().items() for d in deps if d in RANK and m in RANK and RANK[d] > RANK[m]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_check_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from cputune.selector import ram_needed\n    import cputune.probe\n")
    assert imports_of(f) == {"selector", "probe"}
