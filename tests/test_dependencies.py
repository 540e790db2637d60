"""What pyproject.toml declares, the package imports: a dependency that nothing imports sits
beside the hand-written code it would replace, or is dead weight in every install (issue 17)."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).parent.parent


def import_names(dist: str) -> set[str]:
    """The top-level modules an installed distribution provides (py-libnuma installs `numa`);
    its own name, normalized, when it is not installed here (tomli on Python 3.11+)."""
    names = {mod for mod, dists in metadata.packages_distributions().items()
             if any(re.sub(r"[-_.]+", "-", d).lower() == re.sub(r"[-_.]+", "-", dist).lower() for d in dists)}
    return names or {re.sub(r"[-.]+", "_", dist).lower()}


def imported_top_levels(folder: Path) -> set[str]:
    out = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                out.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.add(node.module.split(".")[0])
    return out


def test_every_runtime_dependency_is_imported_by_the_package():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    used = imported_top_levels(ROOT / "cputune")
    unused = [d for d in deps if not import_names(re.match(r"[A-Za-z0-9_.-]+", d).group(0)) & used]
    assert unused == [], f"declared in pyproject.toml but imported by no module of cputune/: {unused}"


def test_the_check_maps_distributions_to_their_modules():
    assert "psutil" in import_names("psutil") and import_names("tomli") == {"tomli"}
    assert import_names("no-such-dist") == {"no_such_dist"}
