"""Ready means ready: what the router answers before its first complete serving path.

Until a prefill+decode pair or a mixed worker has registered for the first
time (*start-up*):

* ``GET /v1/models`` answers 503 with ``Retry-After`` (clients and load tools
  poll it until 200, then send requests);
* a generation request waits for the first path, at most ``startup_wait_s``
  (``--startup-wait``; 0: no wait), then gets 503 with ``Retry-After``.

After start-up the gate stays open. Losing every worker later makes a
generation request fail at once with 503 (the dispatcher's answer), not wait —
except while the deployment is *changing shape* (``is_changing``: a supervised
worker is flipping its role or starting): a reshape may leave no complete path
for a moment (2 mixed → 1 prefill + 1 decode flips both workers), and a request
arriving then waits for the path as at start-up instead of failing because of
a planner's or an operator's action.
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

    def __init__(
        self,
        is_ready: Callable[[], bool],
        startup_wait_s: float = 120.0,
        is_changing: Callable[[], bool] | None = None,
    ) -> None:
        self._is_ready = is_ready
        self.startup_wait_s = startup_wait_s
        self.is_changing: Callable[[], bool] = is_changing or (lambda: False)
        self._open = False

    @property
    def open(self) -> bool:
        """True once a complete serving path has been registered (it stays true)."""
        if not self._open and self._is_ready():
            self._open = True
        return self._open

    @property
    def must_wait(self) -> bool:
        """True at start-up, and while a reshape has left no complete serving path."""
        return not self.open or (self.is_changing() and not self._is_ready())  # steady state: one check

    async def wait(self) -> None:
        """Return once a request can be placed (or no reshape is under way any more); raise a 503
        :class:`BackendError` after ``startup_wait_s``."""
        deadline = time.monotonic() + self.startup_wait_s
        while self.must_wait:
            if time.monotonic() >= deadline:
                raise gate_closed() if not self.open else reshape_stuck()
            await asyncio.sleep(POLL_S)


def gate_closed() -> BackendError:
    """The 503 of a request the start-up gate turns away."""
    return BackendError(
        "the deployment is starting: no complete serving path is registered yet",
        status=503,
        retry_after_s=2.0,
    )


def reshape_stuck() -> BackendError:
    """The 503 of a request that waited a whole ``startup_wait_s`` for a reshape to give a path."""
    return BackendError(
        "the deployment is changing shape and has had no complete serving path for too long",
        status=503,
        retry_after_s=2.0,
    )
