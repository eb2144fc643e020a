"""Exclusive process locks on a file (`flock`), naming their holder: the process id is written into the lock file
once it is held, so a process refused can say which one holds it."""

from __future__ import annotations

import fcntl
import os


def take_exclusive(descriptor: int) -> str | None:
    """Takes the exclusive lock of the open file `descriptor` without waiting and writes this process's id into it:
    None once held; otherwise the holder's id as its file says ("unknown" when it says nothing), `descriptor` then
    closed."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        return holder
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return None
