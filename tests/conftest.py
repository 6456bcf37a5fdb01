"""Shared fixtures: real DICOM files in `tmp_path`, pydicom's corpus of odd
real files, rule folders, and two checks that run around every test: no
thread is leaked, and the logging set up by `watcher.cli.main` does not
outlive the test that called it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from accounts import (
    LABS,
    Accounts,
    Centre,
    install_for_everyone,
    make_accounts,
    remove_accounts,
    shared_folder,
)
from harness import DaemonProcess
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

from watcher import headers
from watcher.synthetic import make_dataset, write_dataset

# No example database in the working tree, and no deadline: a slow machine
# must not turn into a failure (no timed assertions anywhere in the suite).
# Hypothesis's caches go to the temporary folder, not into the repository.
settings.register_profile("watcher", database=None, deadline=None)
settings.load_profile("watcher")
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "dicom-watcher-hypothesis"))

#: How long a test's own threads get to finish before they count as leaked.
THREAD_JOIN_SECONDS = 2.0


@pytest.fixture(scope="session", autouse=True)
def _pydicom_configured() -> None:
    """Read as the CLI and the daemon do: odd values are read as they are."""
    headers.configure_pydicom()


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    """Fail a test that leaves a thread running (after a short join)."""
    before = set(threading.enumerate())
    yield
    new = [t for t in threading.enumerate() if t not in before]
    for thread in new:
        thread.join(THREAD_JOIN_SECONDS / max(len(new), 1))
    leaked = [t.name for t in new if t.is_alive()]
    assert not leaked, f"threads leaked by this test: {leaked}"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main()` points the root logger at the sys.stderr of its test (capsys's
    buffer); put back what was there so later tests do not log into it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    pydicom_level = logging.getLogger("pydicom").level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pydicom").setLevel(pydicom_level)


MakeDicom = Callable[..., Path]


@pytest.fixture
def make_dicom() -> MakeDicom:
    """`make_dicom(directory, name=None, **tags) -> Path`: one synthetic MR
    instance (watcher.synthetic.make_dataset) written as a Part 10 file. A tag
    given as None is left out; the default name is `MR.<SOPInstanceUID>`."""

    def make(directory: str | os.PathLike[str], name: str | None = None, **tags: Any) -> Path:
        ds = make_dataset(**tags)
        return write_dataset(ds, Path(directory) / (name or f"MR.{ds.SOPInstanceUID}"))

    return make


@pytest.fixture(scope="session")
def pydicom_corpus() -> Path:
    """pydicom's folder of odd real test files (local, nothing downloaded)."""
    return Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent


@pytest.fixture(scope="session")
def charset_corpus(pydicom_corpus: Path) -> Path:
    """pydicom's character-set test files, beside test_files."""
    folder = pydicom_corpus.parent / "charset_files"
    assert (folder / "chrFren.dcm").is_file(), f"no charset files in {folder}"
    return folder


class RulesFolder:
    """A folder of rule files; `write` adds one (a dict is dumped as YAML, a
    str is written as is, so a test controls every line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, content: str | dict[str, Any]) -> Path:
        file = self.path / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        file.write_text(text, encoding="utf-8")
        return file

    def rule(
        self,
        name: str,
        destination: str | os.PathLike[str],
        match: dict[str, str] | None = None,
        path: str = "{PatientID}/{SeriesNumber:03d}_{SeriesDescription}/{InstanceNumber:05d}.dcm",
    ) -> Path:
        return self.write(
            name,
            {"name": name, "match": match or {}, "destination": str(destination), "path": path},
        )

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


@pytest.fixture
def rules_dir(tmp_path: Path) -> RulesFolder:
    return RulesFolder(tmp_path / "rules")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Makes `DaemonProcess`es (the real daemon, as a subprocess) on
    `tmp_path`; every one still running at the end is killed."""
    made: list[DaemonProcess] = []

    def make(**settings: object) -> DaemonProcess:
        run = DaemonProcess(tmp_path, **settings)
        made.append(run)
        return run

    yield make
    for run in made:
        run.close()


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """An existing lab destination: tmp_path/nas/smithlab."""
    folder = tmp_path / "nas" / "smithlab"
    folder.mkdir(parents=True)
    return folder


# --- real accounts (tests/accounts.py) ------------------------------------------------------


@pytest.fixture(scope="session")
def accounts() -> Iterator[Accounts]:
    made = make_accounts(LABS)
    yield made
    remove_accounts(made)


@pytest.fixture(scope="session")
def service_python(accounts: Accounts) -> Iterator[Path]:
    folder = shared_folder("dw-install-")
    yield install_for_everyone(folder)
    shutil.rmtree(folder)


@pytest.fixture
def centre(accounts: Accounts, service_python: Path) -> Iterator[Centre]:
    root = shared_folder("dw-centre-")
    made = Centre(root, accounts, service_python)
    yield made
    made.close()
    shutil.rmtree(root)
