"""The process that holds a scheduler claim, and whether it has provably stopped.

A claim in the `runs` table records its runner's host name, process id and, on Linux, when the process started
(boot id, pid namespace and start time in clock ticks), so a pid reused by a later process is told apart. A
claim whose runner ran on this host, in this boot and pid namespace, and whose process is gone (or a zombie,
or another process under its pid) is taken over at once instead of blocking its interval for the rest of its
lease. Anything less than proof (another host, another boot, a system without /proc) leaves the lease to decide.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
#: Process states that run no code any more: zombie (exited, not yet reaped) and dead.
_STOPPED_STATES = frozenset({"Z", "X", "x"})


@dataclass(frozen=True)
class RunnerProcess:
    """A process, as a claim records it. `started`: "<boot id>/<pid namespace>/<start ticks>" on Linux, else
    None; with it, a later process under the same pid is not mistaken for this one."""

    host: str
    pid: int
    started: str | None = None

    @classmethod
    def current(cls) -> RunnerProcess:
        """This process."""
        found = cls.of(os.getpid())
        return found if found is not None else cls(socket.gethostname(), os.getpid())

    @classmethod
    def of(cls, pid: int) -> RunnerProcess | None:
        """The process running under `pid` on this host now (its start unknown without /proc), or None if there
        is none or it is a zombie."""
        here = _here()
        if here is None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:  # another user's process: it exists
                pass
            return cls(socket.gethostname(), pid)
        try:
            ticks = _start_ticks(pid)
        except OSError:
            return cls(socket.gethostname(), pid)  # there, but unreadable: its start is unknown
        return None if ticks is None else cls(socket.gethostname(), pid, f"{here}/{ticks}")

    def gone(self) -> bool:
        """True only if this process provably runs no more: it ran on this host (in this boot and pid namespace,
        where recorded), and no process runs under its pid now, or a later one does."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        here = _here()
        if self.started is None:
            if here is not None:  # recorded where /proc could not be read, checked where it can: no proof
                return False
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        machine, _, ticks = self.started.rpartition("/")
        if here != machine:  # another boot (or a machine of the same name), or another pid namespace
            return False
        try:
            return _start_ticks(self.pid) != ticks  # None: no process, or a zombie
        except OSError:
            return False


def _here() -> str | None:
    """"<boot id>/<pid namespace>" of this process, within which pids and start times identify a process (None
    without /proc). /proc shows the processes of the namespace it was mounted for: the one a runner records."""
    try:
        boot = (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
        namespace = os.readlink(_PROC / "self" / "ns" / "pid")
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot and namespace else None


def _start_ticks(pid: int) -> str | None:
    """When the process `pid` started, in clock ticks since boot; None if no process has that pid or it is a
    zombie. Other errors (OSError) mean its state is unknown."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # pid (comm) state ppid ... starttime: comm may hold spaces and parentheses, so fields count from its end.
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20:
        raise OSError(f"unexpected /proc/{pid}/stat: {stat[:80]!r}")
    return None if fields[0] in _STOPPED_STATES else fields[19]


__all__ = ["RunnerProcess"]
