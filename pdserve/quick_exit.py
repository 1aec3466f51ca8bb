"""End a server process without the interpreter's teardown, once it has cleaned up after itself.

Python's normal exit tears every module down and frees every object one by
one. In a process that has loaded torch and a model this takes 0.3 s alone
and seconds when several such processes exit at once on a few busy cores
(as all of ``pdserve serve``'s workers do on Ctrl-C): most of a deployment's
stop time went there. The service commands (``worker``, ``router``,
``serve``) close their sockets, shared memory, files and child processes
themselves before they return, so nothing is left for that teardown to do:
:func:`exit_now` flushes the logs and the standard streams and ends the
process at once (``os._exit``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn

#: The ``pdserve`` commands whose process ends through :func:`exit_now` when they return.
QUICK_EXIT_COMMANDS = frozenset({"worker", "router", "serve"})


def exit_now(code: int) -> NoReturn:
    """Flush logging and stdout/stderr, then end the process with ``code`` (no atexit, no teardown)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, broken pipe: nothing more to write
            stream.flush()
    os._exit(code)
