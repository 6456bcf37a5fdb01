"""The few error types of dicom-watcher.

Each carries a message meant for one log or terminal line; the CLI turns them
into an exit status without a traceback.
"""

from __future__ import annotations


class WatcherError(Exception):
    """Base of every expected error. `exit_code` is what the CLI returns."""

    exit_code = 2


class ConfigError(WatcherError):
    """The configuration file or a command-line argument is unusable."""


class RuleError(WatcherError):
    """One problem in a rule file, located as `file:line: message`."""

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        super().__init__(f"{file}:{line}: {message}")


class NotRoutable(WatcherError):
    """A file that cannot be routed as a DICOM instance, with the reason why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class DestinationUnavailable(WatcherError):
    """A destination cannot take files now (root missing, full, read-only, denied).

    The file stays where it is; the caller retries later.
    """

    def __init__(self, destination: str, reason: str) -> None:
        self.destination = destination
        self.reason = reason
        super().__init__(f"destination {destination} unavailable: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in a worker process, it comes back pickled.
        return type(self), (self.destination, self.reason)


class DestinationHung(WatcherError):
    """A destination made no progress for `destination_timeout_seconds`:
    its placer was abandoned, and nothing is sent to it until it answers."""

    def __init__(self, destination: str, reason: str) -> None:
        self.destination = destination
        self.reason = reason
        super().__init__(f"destination {destination} hung: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.destination, self.reason)
