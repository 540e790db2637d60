"""No Docker engine runs here: check the Dockerfile statically against the CLI and the README."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from cputune.engine import build
from cputune.cli import cli

ROOT = Path(__file__).parent.parent
TEXT = (ROOT / "Dockerfile").read_text()


def instructions():
    joined = re.sub(r"\\\n", " ", TEXT)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_two_stages_and_the_target_cpu_argument():
    froms = [line for line in instructions() if line.startswith("FROM ")]
    assert [f.split()[-1] for f in froms] == ["build", "final"]
    args = [line for line in instructions() if line.startswith("ARG TARGET_CPU=")]
    assert args and all(a.split("=", 1)[1] in build.target_names() for a in args)
    assert "--target-cpu ${TARGET_CPU}" in TEXT
    assert "COPY --from=build" in TEXT and "VOLUME /models" in TEXT


def test_every_cputune_command_it_calls_exists():
    calls = []
    for line in instructions():
        if line.startswith(("RUN ", "CMD ", "ENTRYPOINT ")):
            body = line.split(None, 1)[1]
            if body.startswith("["):
                words = [w.strip(' "') for w in body.strip("[]").split(",")]
            else:
                words = shlex.split(body)
            for i, w in enumerate(words):
                if w.endswith("cputune") and i + 1 < len(words):
                    calls.append(words[i + 1])
    assert calls, "the Dockerfile calls no cputune command"
    for name in calls:
        assert name in cli.commands, name


def test_run_steps_mirror_the_readme_and_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "RUN scripts/setup.sh" in TEXT
    assert "scripts/setup.sh" in readme and "scripts/setup.sh --tests" in ci
    assert "cputune build" in readme


def test_the_image_serves_by_default():
    [cmd] = [line for line in instructions() if line.startswith("CMD ")]
    words = [w.strip(' "') for w in cmd.split(None, 1)[1].strip("[]").split(",")]
    assert words[:2] == ["cputune", "serve"]
    assert words[words.index("--host") + 1] == "0.0.0.0"  # inside the container, so -p can reach it
    assert words[words.index("--port") + 1] == "8080" and "EXPOSE 8080" in TEXT
    assert "CPUTUNE_MODELS_DIR=/models" in TEXT and "VOLUME /models" in TEXT
    assert "numactl" in TEXT  # the final stage installs it for the placement plans
