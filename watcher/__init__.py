"""dicom-watcher: route DICOM files from a Storage SCP's inbox into lab trees."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
