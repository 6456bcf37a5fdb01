"""scripts/bench runs from end to end on tiny data sets and prints its tables.

No timing is asserted: the figures of a tiny run mean nothing. The test only
checks that every part runs, that each tool has its row (with figures, or
`n/a` and the reason when a tool is missing) and that the targets are listed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from importlib.machinery import SourceFileLoader
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
    "floor: sort's work",
    "floor: run --once's work",
)
SHARE_ROWS = (
    "cp -r && sync",
    "dicom-watcher sort",
    "dicom-watcher run --once",
    "dicom-watcher run",
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
        # cp, dicom-watcher and the floors are always there: figures, not n/a.
        for row in (table[0], *table[3:]):
            assert "n/a" not in row, row
        assert "cpu s" in lines[start + 1]
    profile = next(i for i, line in enumerate(lines) if line.startswith("Profile:"))
    # a share per category for each command, or why py-spy could not run
    assert lines[profile + 1].startswith(("  dicom-watcher sort:", "  n/a:")), lines[profile + 1]
    assert any(line.startswith("Pending instances:") for line in lines)
    assert any(line.startswith("Reception:") for line in lines)
    assert "start-up rescan" in output
    if os.geteuid() == 0 and shutil.which("sshfs"):
        # onto an sshfs share: each tool's row with its figures and requests per file
        for where, data_set in (("loopback", "A"), ("loopback", "B"), ("1 ms round trip", "C")):
            title = f"Network share ({where}), data set {data_set}:"
            start = next(i for i, line in enumerate(lines) if line.startswith(title))
            assert "peak MiB" in lines[start + 1], lines[start + 1]
            rows = lines[start + 2 : start + 2 + len(SHARE_ROWS)]
            for row, tool in zip(rows, SHARE_ROWS, strict=True):
                assert row.strip().startswith(tool) and "n/a" not in row, row
    assert "Targets" in output
    # the local-disk ratios are reference figures, not targets
    targets = output.split("\nTargets", 1)[1].split("\nReference figures", 1)
    assert len(targets) == 2 and "cp -r && sync on A" not in targets[0], output
    assert "sort / cp -r && sync on A:" in targets[1]
    assert any(line.strip().startswith(("met ", "NOT met ", "n/a ")) for line in lines)
    assert "file system:" in output
    if os.geteuid() == 0:
        # The image stays written in full once formatted: no write of a run
        # allocates space in the host's file system (mkfs discards otherwise).
        image = re.search(r"loop-mounted (\d+) GiB image \S+, ([\d.]+) GiB of it allocated", output)
        assert image, output
        assert float(image[2]) >= int(image[1]) * 0.99, image[0]

    report = json.loads(results.read_text())
    for data_set in ("A", "B"):
        assert set(report["results"][data_set]["tools"]) == set(TOOL_ROWS)
    assert report["results"]["pending"]["files"] > 0
    if os.geteuid() == 0 and shutil.which("sshfs"):
        for tool in SHARE_ROWS:
            assert report["results"]["share-loopback-A"][tool]["peak_mib"] > 0, tool
    # the run folder (and its loop mount, as root) is gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("dw-bench-")]


def load_bench() -> types.ModuleType:
    """scripts/bench as a module (it has no .py suffix to import it by)."""
    loader = SourceFileLoader("bench", str(BENCH))
    spec = importlib.util.spec_from_file_location("bench", BENCH, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses look themselves up there
    loader.exec_module(module)
    return module


def test_profile_samples_count_for_the_code_that_made_the_call(tmp_path: Path) -> None:
    """py-spy's raw format: `frame;...;frame count`, the running frame last.
    A system call or library function counts for the dicom-watcher module
    calling it; waits, imports and hashing are told apart."""
    root = 'process 1:"dicom-watcher sort";main (watcher/cli.py:41)'
    raw = tmp_path / "profile.txt"
    raw.write_text(
        f"{root};read_open (watcher/headers.py:148) 5\n"
        f"{root};read_values (watcher/fastheader.py:122);_walk (watcher/fastheader.py:216) 3\n"
        f"{root};place (watcher/placement.py:256);dumps (multiprocessing/reduction.py:51) 2\n"
        f"{root};route (watcher/rules.py:112);sha (hashlib.py:10) 4\n"
        f"{root};run (concurrent/futures/process.py:344);Condition.wait (threading.py:327) 4\n"
        f"{root};run (threading.py:982);_worker (concurrent/futures/thread.py:81) 2\n"
        f"{root};_find_and_load (<frozen importlib._bootstrap>:1176) 1\n"
        f"{root};read_open (watcher/headers.py:165);sha256_of_fd (watcher/placement.py:667) 7\n"
        'process 2:"x" 1\n'
        'process 3:"x";_python_exit (concurrent/futures/process.py:98) 2\n'
        'process 3:"x";shutdown (logging/__init__.py:2200) 3\n'
    )
    bench = load_bench()
    categories, lines, total = bench.read_profile(raw)
    assert total == 34
    by_start = {name.split(" (")[0]: count for name, count in categories.items()}
    assert by_start == {
        "reading headers": 8,
        "handing work between processes": 4,
        "the rest of dicom-watcher": 4,
        "waiting": 6,
        "start-up": 1,
        "hashing files": 7,
        "other": 1,
        "outside dicom-watcher": 3,
    }
    assert lines["headers.py:148 read_open"] == 5
