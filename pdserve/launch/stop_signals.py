"""SIGINT/SIGTERM in the launcher: the first stops the deployment gracefully, a second one hurries it.

1. The first signal asks the supervisor to stop: it starts and restarts nothing
   any more and closes its backend, which sends every process one SIGTERM:
   workers finish the requests they have and the router its streams, for up to
   the backend's grace period; whatever still runs then is killed.
2. A second signal while that close runs makes the close start over, so every
   process still running gets a second SIGTERM: workers and router stop at
   once, without draining. Later signals are ignored (the close is bounded).

The processes of the local backend run in process groups of their own, so a
terminal's Ctrl-C reaches only the launcher and each process gets its signals
from here, one at a time.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger(__name__)


class StopNow(Exception):
    """A second signal came while the deployment was stopping."""


class StopSignals:
    """The launcher's SIGINT/SIGTERM handling (module docstring); ``stop`` is set on the first signal."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._closing = False
        self._hurried = False

    def install(self) -> None:
        """Handle SIGINT and SIGTERM from now on (main thread only)."""
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self._stop.is_set():
            logger.info("signal %d: stopping the deployment (again to stop without draining)", signum)
            self._stop.set()
        elif self._closing and not self._hurried:
            self._hurried = True
            raise StopNow(signum)

    def close(self, close: Callable[[], None]) -> None:
        """Run ``close`` (it signals every process and waits); on a second signal, run it again."""
        self._closing = True
        try:
            close()
        except StopNow as exc:
            logger.warning("signal %s again: stopping every process now, without draining", exc)
            close()
        finally:
            self._hurried = True  # from now on signals are ignored: the stop is done or on its way out
