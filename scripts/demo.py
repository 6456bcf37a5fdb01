"""The demo: a receiver and dicom-watcher on ./demo, fed sample studies.

Run it through `scripts/demo`, which sets up the environment first. It:
1. makes ./demo afresh: inbox/, state/, rules/ (the example rules, pointed at
   demo/nas/<lab>), the lab folders, and sample studies to send;
2. starts the receiver: dcmtk storescp (scripts/storescp.sh) or, where dcmtk
   is missing, pynetdicom's storescp, and says so;
3. starts `dicom-watcher run` on the demo config;
4. sends the studies with storescu (scripts/send.sh, or pynetdicom's storescu);
5. serves the status page (`dicom-watcher web`) and prints its address;
6. waits until every study is placed (at a terminal, then until Ctrl-C, with
   the page up; --no-wait: not), prints the lab trees and the log's study
   summaries, and stops everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import yaml

from watcher.synthetic import StudySpec, write_dataset, write_study

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo"
AE_TITLE = "DICOMWATCHER"
QUIET_SECONDS = 3


def main() -> int:
    if DEMO.exists():
        shutil.rmtree(DEMO)
    inbox, outgoing = DEMO / "inbox", DEMO / "outgoing"
    labs = write_rules()
    expected = write_samples(outgoing)
    config = DEMO / "dicom-watcher.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "inbox": "inbox",
                "rules": "rules",
                "state": "state",
                "quiet_seconds": QUIET_SECONDS,
                "settle_seconds": 0.5,
                "rescan_seconds": 5,
            }
        )
    )
    inbox.mkdir(parents=True)
    port = free_port()
    log_file = DEMO / "dicom-watcher.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        receiver, sender = start_receiver(port, inbox)
        processes.append(receiver)
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "watcher",
                "run",
                "--config",
                str(config),
                "--log-file",
                str(log_file),
            ],
            cwd=DEMO,
            stderr=subprocess.DEVNULL,
        )
        processes.append(daemon)
        web_port = free_port()
        web = subprocess.Popen(
            [sys.executable, "-m", "watcher", "web", "--config", str(config)]
            + ["--listen", f"127.0.0.1:{web_port}", "--log-file", str(DEMO / "web.log")],
            cwd=DEMO,
            stderr=subprocess.DEVNULL,
        )
        processes.append(web)
        wait_for_port(web_port)
        print(
            f"demo: status page at http://127.0.0.1:{web_port}/ "
            f"(metrics at http://127.0.0.1:{web_port}/metrics)"
        )
        wait_for_port(port)
        print(
            f"demo: sending {sum(expected.values())} instances of {len(expected)} studies "
            f"to {AE_TITLE}@127.0.0.1:{port}"
        )
        sender(port, outgoing)
        summaries = wait_for_placement(log_file, expected, inbox)
        if sys.stdin.isatty() and "--no-wait" not in sys.argv:
            print(
                f"demo: every study is placed; the status page stays at "
                f"http://127.0.0.1:{web_port}/ until Ctrl-C"
            )
            with contextlib.suppress(KeyboardInterrupt):
                daemon.wait()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        print(f"demo: dicom-watcher stopped (exit {daemon.returncode})")
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
    print_tree(labs)
    print("\nstudy summaries from the log:")
    for line in summaries:
        print("  " + line)
    print_unplaced(DEMO / "state")
    print(
        f"\ndemo folder: {DEMO} (log: {log_file.relative_to(REPO)}); "
        "`dicom-watcher status --config demo/dicom-watcher.yaml` shows the last state."
    )
    return 0


def write_rules() -> list[Path]:
    """The example rules of rules/, pointed at lab folders under demo/nas."""
    rules = DEMO / "rules"
    rules.mkdir(parents=True)
    labs = []
    for source in sorted((REPO / "rules").glob("*.yaml")):
        rule = yaml.safe_load(source.read_text())
        lab = DEMO / "nas" / source.stem
        lab.mkdir(parents=True)
        labs.append(lab)
        text = source.read_text().replace(
            f"destination: {rule['destination']}", f"destination: {lab}"
        )
        (rules / source.name).write_text(text)
    return labs


def write_samples(folder: Path) -> dict[str, int]:
    """Studies for the example labs, plus real odd files from pydicom;
    returns {StudyInstanceUID: instances}."""
    specs = [
        StudySpec(patient_id="SUBJ01", patient_name="Miller^Richard", series=3, instances=10),
        StudySpec(
            patient_id="SUBJ02",
            patient_name="Müller^Jürgen",
            description="SMITH^Pilot",
            series=2,
            instances=8,
        ),
        StudySpec(
            patient_id="JP001",
            patient_name="Yamada^Tarou",
            description="Motor task",
            institution="Tokyo",
            series=2,
            instances=6,
            extra={"ReferringPhysicianName": "Jones^Mary"},
        ),
    ]
    expected = {}
    for number, spec in enumerate(specs):
        write_study(spec, folder / f"study{number}")
        expected[spec.study_uid] = spec.series * spec.instances
    corpus = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    for path in (
        corpus / "CT_small.dcm",
        corpus / "MR_small.dcm",
        corpus.parent / "charset_files" / "chrFren.dcm",
    ):
        dataset = pydicom.dcmread(path)
        name = path.name
        write_dataset(dataset, folder / "pydicom" / name)
        expected[dataset.StudyInstanceUID] = expected.get(dataset.StudyInstanceUID, 0) + 1
    return expected


def start_receiver(port: int, inbox: Path):  # type: ignore[no-untyped-def]
    """dcmtk storescp when installed, else pynetdicom's; returns (process, send)."""
    env = {
        **os.environ,
        "PORT": str(port),
        "AE_TITLE": AE_TITLE,
        "INBOX": str(inbox),
        "TCP_NODELAY": "1",
    }
    wanted = os.environ.get("DW_DEMO_RECEIVER", "")  # "pynetdicom" forces the fallback
    if wanted != "pynetdicom" and dcmtk_installed():
        print(f"demo: receiver: dcmtk storescp on port {port}, writing into {inbox}")
        receiver = subprocess.Popen(
            [str(REPO / "scripts" / "storescp.sh")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def send(port: int, folder: Path) -> None:
            subprocess.run(
                [str(REPO / "scripts" / "send.sh"), "-p", str(port), "-a", AE_TITLE, str(folder)],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )

        return receiver, send
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        sys.exit(
            "demo: neither dcmtk (apt-get install dcmtk) nor pynetdicom "
            "(pip install pynetdicom) is installed: no receiver to run"
        )
    reason = "asked for" if wanted == "pynetdicom" else "dcmtk is not installed"
    print(f"demo: {reason}: using pynetdicom's storescp on port {port} instead")
    receiver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pynetdicom",
            "storescp",
            str(port),
            "--ae-title",
            AE_TITLE,
            "--output-directory",
            str(inbox),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def send(port: int, folder: Path) -> None:
        files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pynetdicom",
                "storescu",
                "127.0.0.1",
                str(port),
                *files,
                "--called-aet",
                AE_TITLE,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    return receiver, send


def dcmtk_installed() -> bool:
    """dcmtk's storescp and storescu on PATH (pynetdicom installs programs of
    the same names, which scripts/storescp.sh and send.sh pass over)."""
    return all(
        any(_is_dcmtk(Path(folder) / name) for folder in os.environ["PATH"].split(os.pathsep))
        for name in ("storescp", "storescu")
    )


def _is_dcmtk(program: Path) -> bool:
    if not os.access(program, os.X_OK):
        return False
    try:
        version = subprocess.run([program, "--version"], capture_output=True, text=True)
    except OSError:
        return False
    return "dcmtk" in version.stdout + version.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    sys.exit(f"demo: the receiver did not listen on port {port} within {timeout} s")


def wait_for_placement(
    log_file: Path, expected: dict[str, int], inbox: Path, timeout: float = 120
) -> list[str]:
    """Wait until every expected instance was placed; return the summary lines."""
    print(f"demo: waiting for the studies to go quiet ({QUIET_SECONDS} s) and be placed ...")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        placed = [line for line in lines if "event=study_placed" in line]
        done = {uid for uid in expected if any(f"study={uid} " in line for line in placed)}
        inbox_empty = not any(p.is_file() for p in inbox.rglob("*"))
        if done == set(expected) and inbox_empty:
            return [line.split(" ", 2)[2] for line in placed]
        time.sleep(0.2)
    sys.exit(f"demo: not every study was placed within {timeout} s; see {log_file}")


def print_tree(labs: list[Path], files_shown: int = 2) -> None:
    print("\nlab trees:")
    for lab in labs:
        print(f"{lab.relative_to(REPO)}/")
        for folder, folders, files in sorted(os.walk(lab)):
            folders.sort()
            depth = Path(folder).relative_to(lab).parts
            if not depth:
                continue
            indent = "    " * len(depth)
            print(f"{indent[:-4]}  {depth[-1]}/" + (f"  ({len(files)} files)" if files else ""))
            for name in sorted(files)[:files_shown]:
                print(f"{indent}  {name}")
            if len(files) > files_shown:
                print(f"{indent}  ...")


def print_unplaced(state: Path) -> None:
    status_file = state / "status.json"
    if status_file.exists():
        status = json.loads(status_file.read_text())
        print(
            f"\nquarantine: {status['quarantine_files']} file(s), "
            f"unmatched: {status['unmatched_files']} file(s), "
            f"placed: {status['placed_studies']} stud(ies) / {status['placed_files']} file copies"
        )


if __name__ == "__main__":
    sys.exit(main())
