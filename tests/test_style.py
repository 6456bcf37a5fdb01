"""The code's own checks: ruff (lint and format) and mypy, as one test each,
so that the README's test command is the only gate."""

import shutil
import subprocess
from pathlib import Path

import pytest
from harness import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
PATHS = ["watcher", "tests", "scripts/demo.py", "scripts/bench"]


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    program = shutil.which(tool)
    if program is None:
        skip_or_fail(f"{tool} is not installed (pip install -e '.[test]')")
    return subprocess.run([program, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args",
    [("check", *PATHS), ("format", "--check", *PATHS)],
    ids=["lint", "format"],
)
def test_ruff(args):
    result = run("ruff", *args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy():
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
