"""Real Unix accounts for the tenancy tests: a service user, each lab's group
with a member, and dicom-watcher installed where those users can run it.

Making accounts needs root (as in CI); elsewhere the tests that use them skip
with the reason, and under CI=true they fail. This machine's default python3
lives under /root, which other users cannot enter, so the product is
installed into a virtual environment made from Debian's /usr/bin/python3 in
a folder everyone may traverse.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness import REPO, skip_or_fail

#: Every account the suite makes starts with this, so none is mistaken for
#: a real one (and a run that died leaves nothing a later run cannot reuse).
PREFIX = "dwtest-"
SYSTEM_PYTHON = Path("/usr/bin/python3")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    #: Supplementary groups (gids).
    groups: tuple[int, ...] = ()

    def run(
        self, argv: list[str], check: bool = False, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """`argv` as this user (its own groups only), with a minimal environment."""
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            argv,
            user=self.uid,
            group=self.gid,
            extra_groups=list(self.groups),
            env=ENVIRONMENT,
            capture_output=True,
            text=True,
            errors="replace",
            check=check,
            **kwargs,
        )

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            argv,
            user=self.uid,
            group=self.gid,
            extra_groups=list(self.groups),
            env=ENVIRONMENT,
            **kwargs,
        )

    def write(self, path: Path, text: str) -> subprocess.CompletedProcess[str]:
        """Write `path` as this user would (`sh -c 'cat > path'`)."""
        return self.run(["/bin/sh", "-c", 'cat > "$1"', "sh", str(path)], input=text)


ENVIRONMENT = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}


@dataclass
class Accounts:
    """`service` runs the daemon (a member of every lab's group, as it must
    be to write their trees); `labs[name]` is the lab's group and
    `members[name]` a user in it and in no other lab's."""

    service: Account
    labs: dict[str, int] = field(default_factory=dict)
    members: dict[str, Account] = field(default_factory=dict)


def _group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", name], check=True)
        return grp.getgrnam(name).gr_gid


def _user(name: str, group: str, others: list[str]) -> Account:
    try:
        pwd.getpwnam(name)
        subprocess.run(["usermod", "-g", group, "-G", ",".join(others), name], check=True)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "-g",
                group,
                *(["-G", ",".join(others)] if others else []),
                name,
            ],
            check=True,
        )
    entry = pwd.getpwnam(name)
    return Account(name, entry.pw_uid, entry.pw_gid, tuple(grp.getgrnam(g).gr_gid for g in others))


def make_accounts(labs: list[str]) -> Accounts:
    """The service user and, per lab, its group and one member."""
    if os.geteuid() != 0:
        skip_or_fail("making real users and groups needs root")
    if shutil.which("useradd") is None:
        skip_or_fail("useradd is not installed (Debian package passwd)")
    groups = [f"{PREFIX}{lab}" for lab in labs]
    for name in groups:
        _group(name)
    _group(f"{PREFIX}service")
    accounts = Accounts(_user(f"{PREFIX}svc", f"{PREFIX}service", groups))
    for lab, group in zip(labs, groups, strict=True):
        accounts.labs[lab] = grp.getgrnam(group).gr_gid
        accounts.members[lab] = _user(f"{PREFIX}{lab}-member", group, [])
    return accounts


def remove_accounts(accounts: Accounts) -> None:
    for account in (accounts.service, *accounts.members.values()):
        subprocess.run(["userdel", account.name], check=False, capture_output=True)
    for gid in (*accounts.labs.values(), accounts.service.gid):
        subprocess.run(["groupdel", grp.getgrgid(gid).gr_name], check=False, capture_output=True)


def shared_folder(prefix: str) -> Path:
    """A new folder under /tmp that every user may traverse (pytest's own
    temporary folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o755)
    return folder


def install_for_everyone(folder: Path) -> Path:
    """dicom-watcher and the exact versions of requirements/app.lock in a
    virtual environment of /usr/bin/python3 under `folder`; returns its
    `python`."""
    if not SYSTEM_PYTHON.exists():
        skip_or_fail(f"{SYSTEM_PYTHON} is missing (Debian package python3)")
    venv = folder / "venv"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "--require-hashes", "-r", str(REPO / "requirements" / "app.lock")], check=True
    )
    # From a copy of the sources, so that the build leaves nothing in the repository.
    source = folder / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "watcher", source / "watcher", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", str(source)], check=True)
    shutil.rmtree(source)
    return python
