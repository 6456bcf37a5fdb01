"""`python -m watcher` runs the `dicom-watcher` command line."""

from watcher.cli import run

run()
