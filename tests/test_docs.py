"""docs/cli.md is generated from --help; it must match the commands as they are now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_cli_reference_is_up_to_date():
    p = subprocess.run([sys.executable, "-m", "cogapp", "--check", str(ROOT / "docs" / "cli.md")],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, "docs/cli.md is stale: run `cog -r docs/cli.md`\n" + p.stdout + p.stderr
