"""A native crash leaves the Python stacks of every thread in the service's log.

A fault in a C extension on the service's path (the PostgreSQL driver and its libpq, the
Kafka client's record codecs, the JSON codec) or in the interpreter ends the process with
a signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) before any logging can run: all that
is left is a line in the kernel's log. `faulthandler` writes where each thread was, in
Python, to standard error first; the process still dies by the same signal, and the
supervisor's restart and the inbox take over as after any crash. It costs nothing until
a fault: a few signal handlers and an alternate signal stack.
"""

from __future__ import annotations

import faulthandler
import sys


def report_native_crashes() -> bool:
    """Dump the Python stacks to standard error on a fatal signal; False if there is no
    standard error with a file descriptor to write to. Keeps a handler already enabled
    (`PYTHONFAULTHANDLER`, `-X faulthandler`)."""
    if faulthandler.is_enabled():
        return True
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (RuntimeError, ValueError, OSError, AttributeError):
        return False  # no stderr (None), or one without a file descriptor (io.StringIO)
    return True
