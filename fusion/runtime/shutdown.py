"""Leaving a process the way Python would, minus interpreter finalization."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn

_OWNED = [False]


def own_process() -> None:
    """Mark this process as a command's own (the console entry point): it ends with `exit_now`, so choices for
    the rest of its life (such as freezing the collector's view of its imports) are the command's to make. Not
    called where `main` runs inside another program (tests, notebooks)."""
    _OWNED[0] = True


def process_owned() -> bool:
    """Whether `own_process` was called in this process."""
    return _OWNED[0]


def exit_now(code: int) -> NoReturn:
    """Exit with `code` the way Python would, minus interpreter finalization.

    Arrow's I/O threads can still hold Python objects after a command's work is done (a streaming CSV reader's
    file and row handler, a scan through deltalake's Python file system on an object store). One that releases
    them while the interpreter finalizes needs the GIL that is gone, and the process aborts (exit status -6)
    after finishing its work. So: run threading's exit hooks and wait for non-daemon threads (as Python does),
    run the atexit functions (logging, temporary files, weakref finalizers), flush the standard streams, and end
    the process with `os._exit`. Every file Fusion writes is closed (and its store commits complete) before
    `main` returns.
    """
    threading._shutdown()  # type: ignore[attr-defined]  # what Python runs first: exit hooks, then joins
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe takes nothing more
            stream.flush()
    os._exit(code)
