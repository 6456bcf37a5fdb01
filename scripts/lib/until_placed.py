"""Run `dicom-watcher run` until its inbox is empty, then stop it.

    until_placed.py DICOM-WATCHER CONFIG INBOX

scripts/bench times the daemon's placement of a full inbox with it: the
daemon removes a file from the inbox once its copies are durable, so an
empty inbox means every file is placed; the SIGTERM that follows lets it
finish what is in flight (the manifests) before it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_SECONDS = 0.05


def holds_a_file(folder: str) -> bool:
    """Whether anything but folders is left under `folder`. Stops at the
    first file: a walk of the whole inbox every 50 ms (20,000 files: 7 ms)
    would take processor time from the daemon it times."""
    return any(files for _, _, files in os.walk(folder))


def main(argv: list[str]) -> int:
    program, config, inbox = argv
    daemon = subprocess.Popen([program, "run", "--config", config])
    try:
        while holds_a_file(inbox):
            if daemon.poll() is not None:
                print(f"until_placed: the daemon exited with {daemon.returncode}", file=sys.stderr)
                return 1
            time.sleep(POLL_SECONDS)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
    return daemon.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
