"""README's first command: the demo ends with a sorted lab tree on screen."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import skip_or_fail

REPO = Path(__file__).resolve().parent.parent


def run_demo(receiver: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={**os.environ, "DW_DEMO_RECEIVER": receiver},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("receiver", ["dcmtk", "pynetdicom"])
def test_demo_places_every_sample_study_and_shows_the_tree(receiver):
    if receiver == "dcmtk" and not shutil.which("storescp"):
        skip_or_fail("dcmtk's storescp is not installed (apt-get install dcmtk)")
    if receiver == "pynetdicom" and importlib.util.find_spec("pynetdicom") is None:
        skip_or_fail("pynetdicom is not installed (pip install -e '.[test]')")
    out = run_demo(receiver)
    if receiver == "pynetdicom":
        assert "using pynetdicom's storescp" in out
    else:
        assert "receiver: dcmtk storescp" in out
    assert "lab trees:" in out and "study summaries from the log:" in out
    assert re.search(r"demo: status page at http://127\.0\.0\.1:\d+/ ", out), out
    assert "demo/nas/smithlab/" in out and "20261125_SMITH^Memory/" in out
    assert "Yamada_JP001/" in out  # joneslab: by referring physician
    summaries = [line for line in out.splitlines() if "event=study_placed" in line]
    assert len(summaries) == 9  # 3 synthetic studies to 2 labs each, 3 real files to the archive
    assert "quarantine: 0 file(s), unmatched: 0 file(s)" in out
    assert not any((REPO / "demo" / "inbox").iterdir()), "the demo's inbox drained"
