"""Ready means ready: what the router answers before its first complete serving path.

Until a prefill+decode pair or a mixed worker has registered for the first
time (*start-up*):

* ``GET /v1/models`` answers 503 with ``Retry-After`` (clients and load tools
  poll it until 200, then send requests);
* a generation request waits for the first path, at most ``startup_wait_s``
  (``--startup-wait``; 0: no wait), then gets 503 with ``Retry-After``.

After start-up the gate stays open: losing every worker later makes a
generation request fail at once with 503 (the dispatcher's answer), not wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pdserve.router.backend import BackendError

#: How often a waiting request looks again.
POLL_S = 0.05


class StartupGate:
    """Opens for good the first time ``is_ready()`` is true."""

    def __init__(self, is_ready: Callable[[], bool], startup_wait_s: float = 120.0) -> None:
        self._is_ready = is_ready
        self.startup_wait_s = startup_wait_s
        self._open = False

    @property
    def open(self) -> bool:
        """True once a complete serving path has been registered (it stays true)."""
        if not self._open and self._is_ready():
            self._open = True
        return self._open

    async def wait(self) -> None:
        """Return once open; raise a 503 :class:`BackendError` after ``startup_wait_s``."""
        deadline = time.monotonic() + self.startup_wait_s
        while not self.open:
            if time.monotonic() >= deadline:
                raise gate_closed()
            await asyncio.sleep(POLL_S)


def gate_closed() -> BackendError:
    """The 503 of a request the start-up gate turns away."""
    return BackendError(
        "the deployment is starting: no complete serving path is registered yet",
        status=503,
        retry_after_s=2.0,
    )
