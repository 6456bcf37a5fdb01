"""The daemon yields the processor to the receiver.

storescp writes what the scanners send, and a scanner waits while storescp
cannot keep up; what the daemon does with a file can wait a moment (a study
is placed only once it has been quiet for `quiet_seconds`). So the daemon
runs at a lower priority than the receiver, but not at the idle one: on a
machine that stays busy it still gets about a tenth of a processor.
"""

from __future__ import annotations

import os

#: The daemon's niceness (storescp and the rest run at 0).
NICENESS = 10

AUTOGROUP = "/proc/self/autogroup"


def yield_to_receiver(niceness: int = NICENESS) -> str:
    """Lower this process's processor priority to `niceness` (never raise it);
    return what was done, for the log.

    Two levers, because Linux weighs sessions against each other before the
    niceness of their processes counts (the "autogroup", on by default): the
    calling thread's niceness, which the threads and child processes started
    after it inherit (call this before starting any); and, when this process
    leads its session, as under systemd or `setsid`, its autogroup's. A
    process in a session of someone else's (a shell) leaves the autogroup
    alone, for it is shared with the shell."""
    done = []
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if current < niceness:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
            current = niceness
        done.append(f"nice {current}")
    except OSError as error:
        done.append(f"nice unchanged ({error.strerror})")
    if os.getsid(0) == os.getpid():
        try:
            with open(AUTOGROUP, encoding="ascii") as handle:
                group = int(handle.read().rsplit("nice", 1)[1])
            if group < niceness:
                with open(AUTOGROUP, "w", encoding="ascii") as handle:
                    handle.write(str(niceness))
                group = niceness
            done.append(f"autogroup nice {group}")
        except (OSError, ValueError, IndexError):
            pass  # no autogroups (not Linux, or a kernel without them)
    return ", ".join(done)
