"""Hostile headers: values that try to leave the destination, hide, break a
share, or are encoded in every character set. Every placed path must be a
safe path inside its destination, and placing copies again must give the
same names."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from faultlib import own
from harness import DaemonProcess, lab_files, paths_under, snapshot

from watcher.synthetic import make_dataset, write_dataset
from watcher.template import MAX_COMPONENT_BYTES, WINDOWS_RESERVED

TEMPLATE = (
    "{PatientID}/{PatientName}/{StudyDescription}/{SeriesNumber:03d}_{SeriesDescription}/"
    "{InstanceNumber:05d}.dcm"
)
UNSAFE = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f-\x9f]')

HOSTILE: list[dict[str, object]] = [
    {"PatientID": "../../x", "StudyDescription": "../../../etc"},
    {"PatientID": "/abs/olute", "SeriesDescription": "/etc/passwd"},
    {"PatientID": "..", "StudyDescription": ".", "SeriesDescription": ".."},
    {
        "PatientID": "NUL\x00ID",
        "StudyDescription": "a\x00b\x01c\x1b[31m\x7fd\x9b",
        "SeriesDescription": "tab\there\nnewline\r",
    },
    {"PatientID": "LONG", "StudyDescription": "D" * 320, "SeriesDescription": "é" * 200},
    {"PatientID": "山" * 100, "PatientName": "長" * 130 + "^" + "名" * 130},
    {
        "PatientID": "CON",
        "PatientName": "nul",
        "StudyDescription": "aux.txt",
        "SeriesDescription": "LPT1",
    },
    {"PatientID": "com1.dcm", "StudyDescription": "PRN ", "SeriesDescription": "conin$"},
    {"PatientID": "C:\\Windows\\x", "PatientName": "a\\b", "SeriesDescription": "a/b\\c"},
    {"PatientID": "JP01", "PatientName": "山田^太郎=やまだ^たろう", "StudyDescription": "脳 MRI"},
    {"PatientID": "AR01", "PatientName": "محمد^علي", "StudyDescription": "دراسة"},
    {"PatientID": "", "PatientName": "", "StudyDescription": "   ", "SeriesDescription": None},
    {"PatientID": ".hidden", "StudyDescription": "x. . .", "SeriesDescription": "..."},
    {"PatientID": "-rf", "StudyDescription": "~root", "SeriesDescription": "$(reboot)"},
    {"PatientID": '*?<>|"', "StudyDescription": "a／b∕c", "SeriesDescription": "\u202eevil"},
]
#: Undeclared UTF-8: no SpecificCharacterSet, raw UTF-8 bytes in the name.
UNDECLARED = ["Müller^Jürgen", "山田^花子"]


def hostile_files(folder: Path, charset_corpus: Path) -> list[Path]:
    files = []
    for number, values in enumerate(HOSTILE, start=1):
        ds = make_dataset(InstanceNumber=number, **values)
        files.append(write_dataset(ds, folder / f"hostile{number:02d}.dcm"))
    for number, name in enumerate(UNDECLARED, start=1):
        ds = make_dataset(
            PatientID=f"UTF8-{number}", InstanceNumber=number, SpecificCharacterSet=None
        )
        ds.add_new(0x00100010, "PN", name.encode("utf-8"))  # bytes: written as they are
        files.append(write_dataset(ds, folder / f"undeclared{number}.dcm"))
    # Every file of pydicom's character-set corpus (FileInfo.txt included).
    for source in sorted(charset_corpus.iterdir()):
        if source.is_file():
            target = folder / f"charset_{source.name}"
            shutil.copyfile(source, target)
            files.append(target)
    return files


def assert_safe_inside(path: Path, destination: Path) -> None:
    real = os.path.realpath(path)
    assert real.startswith(os.path.realpath(destination) + os.sep), f"{path} is outside"
    parts = Path(real).relative_to(os.path.realpath(destination)).parts
    assert len(parts) == len(TEMPLATE.split("/")), f"{path}: not one component per template part"
    for part in parts:
        assert part and part not in (".", ".."), f"{path}: empty or dot component"
        assert not part.startswith("."), f"{path}: hidden component {part!r}"
        assert not UNSAFE.search(part), f"{path}: unsafe character in {part!r}"
        assert len(part.encode()) <= MAX_COMPONENT_BYTES, f"{path}: component over 255 bytes"
        assert part.split(".")[0].upper().rstrip(" ") not in WINDOWS_RESERVED, f"{path}: {part!r}"
        assert part == part.rstrip(". "), f"{path}: trailing dot or blank in {part!r}"


def sort(sources: Path, rules: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "watcher", "sort", str(sources), "--rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    return done.stdout


def test_hostile_headers_stay_inside_the_destination(tmp_path, daemons, account, charset_corpus):
    lab = tmp_path / "nas" / "lab"
    lab.mkdir(parents=True)
    run = DaemonProcess(tmp_path / "node")
    daemons.append(run)
    run.add_rule("lab", lab, path=TEMPLATE)
    originals = tmp_path / "originals"
    files = hostile_files(originals, charset_corpus)
    absolute = [Path("/abs"), Path("/etc/passwd/SMITH^Memory"), Path("/x")]
    existed = {p: p.exists() for p in absolute}
    before = paths_under(tmp_path)

    run.start()
    run.wait_event("watching")
    entered = {}
    for source in files:
        target = run.inbox / source.name
        target.write_bytes(source.read_bytes())
        entered[str(target)] = hashlib.sha256(target.read_bytes()).hexdigest()
    run.wait_settled(timeout=60)  # (its manifests written too)
    placed = lab_files(lab)
    for path in placed:
        assert_safe_inside(path, lab)
    names = {p.relative_to(lab).as_posix() for p in placed}
    components = {part for name in names for part in name.split("/")}
    # Letters of every script stay; an undeclared UTF-8 name is read as UTF-8.
    assert "山田^太郎" in components and "محمد^علي" in components
    assert {"Müller^Jürgen", "山田^花子"} <= components
    assert any(c.endswith(".dcm") for c in components)
    assert all(existed[p] == p.exists() for p in absolute), "something was written outside"
    assert not (tmp_path / "x").exists() and not (tmp_path / "etc").exists()

    # Placing copies again gives the same names: into the same tree, each is
    # "already present"; into a fresh tree, the same relative paths appear.
    copies = tmp_path / "copies"
    shutil.copytree(originals, copies)
    lab_before = snapshot(lab)
    summary = sort(copies, run.rules)
    assert f"placed=0 already_present={len(placed)} " in summary, summary
    assert snapshot(lab) == lab_before
    again = tmp_path / "nas" / "again"
    again.mkdir()
    rules_again = tmp_path / "rules-again"
    rules_again.mkdir()
    (rules_again / "lab.yaml").write_text(
        yaml.safe_dump({"match": {}, "destination": str(again), "path": TEMPLATE})
    )
    sort(copies, rules_again)
    assert {p.relative_to(again).as_posix() for p in lab_files(again)} == names

    assert run.terminate() == 0
    # Not unique_uids: pydicom's corpus holds one SOPInstanceUID with two
    # different encodings (chrSQEncoding*), rightly kept side by side. exact
    # (every lab file is one that entered, no content twice) still proves
    # that nothing was placed twice.
    counts = account(
        entered,
        [lab],
        run.state,
        run.inbox,
        root=tmp_path,
        before=before,
        allowed=[*own(run), originals, copies, again, rules_again],
        exact=True,
    )
    assert counts["still_in_inbox"] == 0
    assert counts["placed"] + counts.get("quarantine", 0) == len(files)
    assert counts["placed"] >= len(HOSTILE) + len(UNDECLARED) + 15
    quarantined = {p.name for p in (run.state / "quarantine").rglob("*.reason.txt")}
    assert "charset_FileInfo.txt.reason.txt" in quarantined
