"""A real network share for the tests: sshfs (FUSE) over a private sshd on
loopback, with key authentication and a port of its own, and the ways a
file server fails: frozen (its sftp-server stopped: every operation on the
mount waits), killed (the mount answers ENOTCONN), and mounted again.

Needs root (sshd, FUSE mounts) and Debian's sshfs and openssh-server; a
missing one skips on a workstation and fails under CI=true.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from harness import free_port, listening, skip_or_fail, wait_for

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def share_problem() -> str:
    """Why a share cannot be set up here (root, sshfs, sshd, FUSE), or ""."""
    if os.geteuid() != 0:
        return "a private sshd and FUSE mounts need root"
    for tool in ("sshfs", "ssh-keygen", "fusermount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages sshfs, openssh-client)"
    for program in (SSHD, SFTP_SERVER):
        if not os.path.exists(program):
            return f"{program} is missing (Debian package openssh-server)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: this machine cannot mount FUSE file systems"
    return ""


def require_share_tools() -> None:
    problem = share_problem()
    if problem:
        skip_or_fail(problem)


class DelayProxy:
    """A TCP relay on loopback that holds everything it carries for `delay`
    seconds each way: a file server `2 * delay` of round trip away. It only
    delays, never slows the flow of bytes."""

    def __init__(self, target: int, delay: float) -> None:
        self.target, self.delay = target, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for end in (client, server):  # relayed as it comes, as sshd and ssh send it
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                late: queue.Queue[tuple[float, bytes]] = queue.Queue()
                for work, argument in ((self._read, source), (self._write, sink)):
                    thread = threading.Thread(target=work, args=(argument, late), daemon=True)
                    self.threads.append(thread)
                    thread.start()

    def _read(self, source: socket.socket, late: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            try:
                data = source.recv(1 << 16)
            except OSError:
                data = b""
            late.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _write(self, sink: socket.socket, late: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            due, data = late.get()
            time.sleep(max(due - time.monotonic(), 0))
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        """Stop relaying (after the mount is gone) and end every thread."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for connection in self.sockets:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(10)
        for connection in self.sockets:
            connection.close()


class Share:
    """`export` on the "server" side, mounted at `mount` through sshfs;
    `delay`: through a `DelayProxy` that far away each way. The server logs
    what it is asked to do (opens, fsyncs, links, renames) in `server_log`."""

    def __init__(self, root: Path, delay: float = 0.0) -> None:
        require_share_tools()
        self.root = root
        self.export = root / "export"
        self.mount = root / "mount"
        self.keys = root / "keys"
        for folder in (self.export, self.mount, self.keys):
            folder.mkdir(parents=True)
        self.keys.chmod(0o700)
        self.port = free_port()
        for name in ("host", "client"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.keys / name)],
                check=True,
            )
        (self.keys / "authorized_keys").write_text((self.keys / "client.pub").read_text())
        self.server_log = root / "sftp-server.log"
        self.config = root / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.keys / 'host'}",
                    f"AuthorizedKeysFile {self.keys / 'authorized_keys'}",
                    f"PidFile {root / 'sshd.pid'}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    # (run by the user's shell: the redirection is the shell's)
                    f"Subsystem sftp {SFTP_SERVER} -e -l VERBOSE 2>>{self.server_log}",
                    "",
                ]
            )
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
        self.sshd = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=open(root / "sshd.log", "ab"),  # noqa: SIM115 - closed with the process
        )
        wait_for(lambda: listening(self.port), 10, f"sshd on port {self.port}")
        self.proxy = DelayProxy(self.port, delay) if delay else None
        self.mounted = False
        self.debug: subprocess.Popen[bytes] | None = None
        self.attach()

    def attach(self, requests: Path | None = None) -> None:
        """Mount the export (again); with `requests`, sshfs logs there every
        SFTP request it sends (`sshfs_debug`: one line each, for counting)."""
        command = [
            "sshfs",
            f"root@127.0.0.1:{self.export}",
            str(self.mount),
            "-p",
            str(self.proxy.port if self.proxy else self.port),
            "-o",
            f"IdentityFile={self.keys / 'client'},StrictHostKeyChecking=no,"
            "UserKnownHostsFile=/dev/null,BatchMode=yes,LogLevel=ERROR",
        ]
        if requests is None:
            subprocess.run(command, check=True, timeout=30)
        else:  # in the foreground, where its log can be read
            with open(requests, "ab") as log:
                self.debug = subprocess.Popen(
                    [*command, "-f", "-o", "sshfs_debug"], stdout=log, stderr=log
                )
        self.mounted = True
        wait_for(lambda: os.path.ismount(self.mount), 10, f"{self.mount} to be mounted")

    def detach(self) -> None:
        """Unmount, lazily (the mount may be dead)."""
        if self.mounted:
            subprocess.run(["fusermount", "-u", "-z", str(self.mount)], check=False)
            self.mounted = False
        if self.debug is not None:
            self.debug.terminate()
            self.debug.wait(10)
            self.debug = None

    def sftp_servers(self) -> list[int]:
        """The pids of the sftp-server processes serving this share."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
                parent = _parent_chain(int(entry))
            except OSError:
                continue
            if command.endswith(b"sftp-server") and self.sshd.pid in parent:
                pids.append(int(entry))
        return pids

    def _signal_servers(self, signum: int) -> None:
        servers = self.sftp_servers()
        assert servers, "no sftp-server serves the share"
        for pid in servers:
            os.kill(pid, signum)

    def freeze(self) -> None:
        """The file server stops answering: every operation on the mount waits."""
        self._signal_servers(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_servers(signal.SIGCONT)

    def kill_server(self) -> None:
        """The file server goes away: the mount answers ENOTCONN."""
        self._signal_servers(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.stat(self.mount / ".")
            except OSError:
                return
            time.sleep(0.05)

    def close(self) -> None:
        for pid in self.sftp_servers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.detach()
        if self.proxy is not None:
            self.proxy.close()
        self.sshd.terminate()
        self.sshd.wait(10)


def _parent_chain(pid: int) -> set[int]:
    """`pid`'s ancestors."""
    chain = set()
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.add(pid)
    return chain


def requests_sent(log: Path) -> collections.Counter[str]:
    """The SFTP requests in a log of `Share.attach(requests=...)`, by type."""
    sent: collections.Counter[str] = collections.Counter()
    for line in log.read_text(errors="replace").splitlines():
        match = re.match(r"\[\d+\] (\w+)", line)
        if match:
            sent[match[1]] += 1
    return sent
