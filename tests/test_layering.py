"""Imports flow one way: cli -> commands -> predict/engine -> machine/model -> core, and the
package's folders are those layers (cputune/core, machine, model, predict, engine, commands; the
cli at the top). A test reads every module's imports (ast, function-level ones included, since
hiding an import in a function does not remove the dependency) and fails on an upward import, a
cycle, or a module outside the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import cputune

PACKAGE = Path(cputune.__file__).parent

# The layers, lowest first: a module may import its own layer (without a cycle) and those below.
# machine and model are one layer (neither needs the other's answers), predict and engine another.
LAYERS = {"core": 0, "machine": 1, "model": 1, "predict": 2, "engine": 2, "commands": 3, "cli": 4}
NAMES = {0: "core", 1: "machine/model", 2: "predict/engine", 3: "commands", 4: "cli"}
TOP = {"cli", "__main__", "__init__", "_bwprobe"}  # cputune/*: the cli, and the C extension (core)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p.split(".")[0] for p in rel.parts]
    return ".".join(parts) if parts[-1] != "__init__" or len(parts) == 1 else ".".join(parts[:-1])


def layer_of(module: str) -> int | None:
    first = module.split(".")[0]
    if first == "_bwprobe":
        return 0
    if first in TOP:
        return LAYERS["cli"]
    return LAYERS.get(first) if "." in module or first in LAYERS else None


def modules() -> dict[str, Path]:
    out = {module_name(p): p for p in PACKAGE.rglob("*.py") if "configs" not in p.relative_to(PACKAGE).parts}
    out.update({p.name.split(".")[0]: p for p in PACKAGE.glob("_*.so")})
    return out


def imports_of(path: Path) -> set[str]:
    """The cputune modules `path` imports (dotted below cputune), at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cputune":
            parts = node.module.split(".")[1:]
            if not parts or parts[0] in LAYERS and len(parts) == 1:
                out |= {".".join([*parts, a.name]) for a in node.names}
            else:
                out.add(".".join(parts))
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("cputune.")}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {d for d in imports_of(p) if d in mods and d != m}
            for m, p in mods.items() if p.suffix == ".py"}


def test_every_module_sits_in_a_layer_folder():
    misplaced = sorted(m for m in modules() if layer_of(m) is None)
    assert not misplaced, f"put these modules in a layer folder ({', '.join(LAYERS)}): {misplaced}"
    top = sorted(m for m in modules() if "." not in m and m not in TOP and m not in LAYERS)
    assert not top, f"only the cli sits at cputune/'s top: move {top} into a layer folder"


def test_no_upward_import():
    bad = [f"{m} ({NAMES[layer_of(m)]}) imports {d} ({NAMES[layer_of(d)]})"
           for m, deps in graph().items() for d in deps
           if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)]
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
    f.write_text("def f():\n    from cputune.predict.selector import ram_needed\n    import cputune.machine.probe\n"
                 "    from cputune.core import errors, stats\n    from cputune import cli\n")
    assert imports_of(f) == {"predict.selector", "machine.probe", "core.errors", "core.stats", "cli"}


def test_an_upward_import_is_seen():
    assert layer_of("core.errors") == 0 and layer_of("predict.selector") == 2 and layer_of("cli") == 4
    assert layer_of("machine.probe") == layer_of("model.synth") == 1
