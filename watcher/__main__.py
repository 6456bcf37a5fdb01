"""`python -m watcher` runs the `dicom-watcher` command line."""

import sys

from watcher.cli import main

sys.exit(main())
