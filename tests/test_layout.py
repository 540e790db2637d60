"""The test suite's own layout: it collects under `--import-mode=importlib` as under the default."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _imported_modules(tree: ast.Module) -> set[str]:
    """Every module an import statement names, as a dotted path; `from . import x` and
    `from tests import x` name x as a module, `from a import b` names only a."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                names.add(node.module)
            if node.module in (None, "tests"):
                names.update(f"tests.{alias.name}" if node.module else alias.name for alias in node.names)
    return names


def _is_test_module(dotted: str) -> bool:
    """test_x, tests.test_x, conftest or tests.conftest (or anything inside one of them)."""
    parts = dotted.split(".")
    if parts[0] == "tests" and len(parts) > 1:
        parts = parts[1:]
    return parts[0].startswith("test_") or parts[0] == "conftest"


def test_no_test_module_imports_another():
    """Shared plain helpers live in tests/helpers.py, shared fixtures in conftest.py: importlib mode
    does not put tests/ on sys.path, so `from test_topology import ...` breaks collection there."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if "fixtures" in path.relative_to(TESTS).parts:  # recorded data, not the suite
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in sorted(_imported_modules(tree)):
            if _is_test_module(name):
                offenders.append(f"{path.relative_to(TESTS)} imports {name}")
    assert offenders == [], f"{offenders}: move what is shared into tests/helpers.py or tests/conftest.py"


def test_the_check_sees_each_import_form():
    src = ("import test_a\nimport tests.test_b as b\nfrom test_c import x\nfrom tests.test_d import y\n"
           "from tests import test_e\nfrom . import test_f\nfrom .test_g import z\nfrom conftest import w\n"
           "import helpers\nfrom helpers import xml_box\nfrom cputune import tune\nimport pytest\n"
           "from cputune.engine.bench import test_point\nfrom tests.helpers import check_inside\n")
    found = sorted(n for n in _imported_modules(ast.parse(src)) if _is_test_module(n))
    assert found == ["conftest", "test_a", "test_c", "test_f", "test_g", "tests.test_b", "tests.test_d",
                     "tests.test_e"]
