"""Real Unix accounts for the tenancy tests: a service user, each lab's group
with a member, and dicom-watcher installed where those users can run it.

Making accounts needs root (as in CI); elsewhere the tests that use them skip
with the reason, and under CI=true they fail. This machine's default python3
lives under /root, which other users cannot enter, so the product is
installed into a virtual environment made from Debian's /usr/bin/python3 in
a folder everyone may traverse.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from harness import REPO, DaemonProcess, skip_or_fail, snapshot, wait_for

from watcher.synthetic import StudySpec, write_study

#: Every account the suite makes starts with this, so none is mistaken for
#: a real one (and a run that died leaves nothing a later run cannot reuse).
PREFIX = "dwtest-"
#: The labs of the test centre (`Centre`).
LABS = ["smith", "jones"]
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
        kwargs.setdefault("env", ENVIRONMENT)
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            argv, user=self.uid, group=self.gid, extra_groups=list(self.groups), **kwargs
        )

    def write(self, path: Path, text: str) -> subprocess.CompletedProcess[str]:
        """Write `path` as this user would (`sh -c 'cat > path'`)."""
        return self.run(["/bin/sh", "-c", 'cat > "$1"', "sh", str(path)], input=text)


ENVIRONMENT = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}


@dataclass
class Accounts:
    """`service` runs the daemon (a member of every lab's group, as it must
    be to write their trees); `labs[name]` is the lab's group and
    `members[name]` a user in it and in no other lab's; `hook_users[name]`
    the account its hooks run under (in the lab's group too)."""

    service: Account
    #: An operator: a member of the service user's group (reads the status).
    operator: Account
    labs: dict[str, int] = field(default_factory=dict)
    members: dict[str, Account] = field(default_factory=dict)
    hook_users: dict[str, Account] = field(default_factory=dict)


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
    # Each hook user has a group of its own, shared with the service user
    # only, through which they pass jobs and results.
    hook_groups = [f"{PREFIX}{lab}-hooks" for lab in labs]
    for name in (*groups, *hook_groups):
        _group(name)
    _group(f"{PREFIX}service")
    accounts = Accounts(
        _user(f"{PREFIX}svc", f"{PREFIX}service", groups + hook_groups),
        _user(f"{PREFIX}operator", f"{PREFIX}service", []),
    )
    for lab, group, hook_group in zip(labs, groups, hook_groups, strict=True):
        accounts.labs[lab] = grp.getgrnam(group).gr_gid
        accounts.members[lab] = _user(f"{PREFIX}{lab}-member", group, [])
        accounts.hook_users[lab] = _user(hook_group, hook_group, [group])
    return accounts


def remove_accounts(accounts: Accounts) -> None:
    gids = {*accounts.labs.values(), accounts.service.gid}
    gids |= {account.gid for account in accounts.hook_users.values()}
    names = []
    for gid in gids:
        with contextlib.suppress(KeyError):
            names.append(grp.getgrgid(gid).gr_name)
    everyone = [accounts.service, accounts.operator, *accounts.members.values()]
    for account in everyone + list(accounts.hook_users.values()):
        subprocess.run(["userdel", account.name], check=False, capture_output=True)
    for name in names:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


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


PATH = "{PatientID}/{SeriesNumber:03d}/{InstanceNumber:05d}.dcm"


class Centre(DaemonProcess):
    """A centre laid out as the operator's documentation says, under a folder
    every user may traverse: rules/ and config owned by root, rules/<lab>/
    root:<lab> 2775, nas/<lab>/ root:<lab> 2770, inbox and state/ the
    service user's alone. `start` runs the daemon as the service user."""

    def __init__(self, root: Path, accounts: Accounts, python: Path) -> None:
        self.accounts, self.python = accounts, python
        self.runners: list[subprocess.Popen[bytes]] = []
        self.nas = root / "nas"
        labs = {}
        for lab, gid in accounts.labs.items():
            tree = self.nas / lab
            tree.mkdir(parents=True)
            os.chown(tree, 0, gid)
            tree.chmod(0o2770)
            labs[lab] = {
                "destinations": [str(tree)],
                "claims": [{"StudyDescription": f"^{lab.upper()}\\^"}],
                "group": f"{PREFIX}{lab}",
                "hook_user": f"{PREFIX}{lab}-hooks",
            }
        super().__init__(root, labs=labs)
        self.rules.chmod(0o755)
        for lab, gid in accounts.labs.items():
            folder = self.rules / lab
            folder.mkdir()
            os.chown(folder, 0, gid)
            folder.chmod(0o2775)
        self.inbox.chmod(0o750)
        self.state.mkdir()
        self.state.chmod(0o750)
        service = accounts.service
        for folder in (self.inbox, self.state):
            os.chown(folder, service.uid, service.gid)
        self.config_path.chmod(0o644)
        self.log_path.touch()  # (root's; the daemon writes it through the descriptor it gets)

    def receive(self, spec: StudySpec) -> dict[str, str]:
        """Write a study into the inbox as the receiver (the service user) would."""
        folder = self.root / "incoming"
        write_study(spec, folder)
        entered = snapshot(folder)
        for path in folder.iterdir():
            os.chown(path, self.accounts.service.uid, self.accounts.service.gid)
            path.chmod(0o640)
            os.rename(path, self.inbox / path.name)
        folder.rmdir()
        return {str(self.inbox / Path(p).name): h for p, h in entered.items()}

    def lab_rule(self, tenant: str, name: str, **keys: object) -> Path:
        """rules/<tenant>/<name>.yaml, written by the lab's member."""
        rule = {"match": {}, "destination": str(self.nas / tenant), "path": PATH, **keys}
        file = self.rules / tenant / f"{name}.yaml"
        member = self.accounts.members[tenant]
        result = member.write(file, yaml.safe_dump(rule, sort_keys=False))
        assert result.returncode == 0, result.stderr
        return file

    def start(self, *args: str, env: dict[str, str] | None = None) -> Centre:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = self.accounts.service.popen(
            [str(self.python), "-m", "watcher", "run", "--config", str(self.config_path)]
            + ["--log-format", "json", *args],
            stdout=log,
            stderr=log,
            cwd=self.root,
            umask=0o007,  # as the systemd unit sets it
        )
        log.close()
        return self

    def start_runner(
        self, lab: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`dicom-watcher hooks --lab` as the lab's hook user, logging JSON
        into runner-<lab>.log; `env` adds to its minimal environment."""
        log = open(self.root / f"runner-{lab}.log", "ab")  # noqa: SIM115 - closed below
        process = self.accounts.hook_users[lab].popen(
            [str(self.python), "-m", "watcher", "hooks", "--lab", lab]
            + ["--config", str(self.config_path), "--log-format", "json", *args],
            stdout=log,
            stderr=log,
            cwd=self.root,
            umask=0o007,
            env={**ENVIRONMENT, **(env or {})},
        )
        log.close()
        self.runners.append(process)
        return process

    def runner_logs(self, lab: str, event: str | None = None) -> list[dict[str, str]]:
        path = self.root / f"runner-{lab}.log"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "raw", "message": line}
            if event is None or record.get("event") == event:
                records.append(record)
        return records

    def wait_runner_event(
        self, lab: str, event: str, count: int = 1, timeout: float = 30.0
    ) -> list[dict[str, str]]:
        return wait_for(  # type: ignore[return-value]
            lambda: len(self.runner_logs(lab, event)) >= count and self.runner_logs(lab, event),
            timeout,
            f"{count} x {event} in runner-{lab}.log",
        )

    def close(self) -> None:
        for process in self.runners:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        super().close()
