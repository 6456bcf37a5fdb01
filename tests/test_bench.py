"""scripts/bench runs from end to end on tiny data sets and prints its tables.

No timing is asserted: the figures of a tiny run mean nothing. The test only
checks that every part runs, that each tool has its row (with figures, or
`n/a` and the reason when a tool is missing) and that the targets are listed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench"

TOOL_ROWS = (
    "cp -r && sync",
    "dcm2niix -r y",
    "thedicomsort",
    "dicom-watcher sort",
    "dicom-watcher run --once",
)


@pytest.mark.slow
def test_bench_tiny_run_prints_every_table(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--tiny",
            "--repeat",
            "1",
            "--quiet-seconds",
            "1",
            "--workdir",
            str(tmp_path),
            "--json",
            str(results),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    output = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{output}\n{done.stderr}"
    lines = output.splitlines()
    for data_set in ("A", "B"):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"Data set {data_set}:"))
        table = lines[start + 2 : start + 2 + len(TOOL_ROWS)]
        for row, tool in zip(table, TOOL_ROWS, strict=True):
            assert row.strip().startswith(tool), f"expected a row for {tool}, got {row!r}"
        # cp and dicom-watcher are always there: they have figures, not n/a.
        for row in (table[0], table[3], table[4]):
            assert "n/a" not in row, row
    assert any(line.startswith("Pending instances:") for line in lines)
    assert any(line.startswith("Behind storescp:") for line in lines)
    assert "start-up rescan" in output
    assert "Targets" in output
    assert any(line.strip().startswith(("met ", "NOT met ", "n/a ")) for line in lines)
    assert "file system:" in output

    report = json.loads(results.read_text())
    for data_set in ("A", "B"):
        assert set(report["results"][data_set]["tools"]) == set(TOOL_ROWS)
    assert report["results"]["pending"]["files"] > 0
    # the run folder (and its loop mount, as root) is gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("dw-bench-")]
