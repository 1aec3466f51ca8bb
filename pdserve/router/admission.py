"""Overload protection and draining: which generation requests the router takes on.

Lifecycle of one generation request's admission:

1. :meth:`Admission.check` — before the body is even read: a draining server
   answers 503, a full one 429, both with ``Retry-After`` and in O(1), so a
   rejection stays fast however loaded the server is.
2. :meth:`Admission.admit` — once the body is parsed and the number of choices
   (prompts × ``n``) is known, before tokenising: checks again and takes one
   slot per choice, returning a :class:`Ticket`.
3. :meth:`Ticket.release` — when the request's generations have all ended
   (a non-streamed answer is collected, a stream has sent its last event or
   its client left, or the request failed). Idempotent.

Ownership: whoever holds the :class:`Ticket` releases it; the app hands a
streamed request's ticket to its response, which releases it after closing
the stream. :meth:`Admission.wait_idle` lets a shutting-down server wait for
every admitted request to end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import anyio

from pdserve.router.errors import APIError

logger = logging.getLogger(__name__)

#: ``Retry-After`` of a 429 (full); slots free as fast as generations end.
OVERLOADED_RETRY_AFTER_S = 1
#: ``Retry-After`` of a 503 (draining); a balancer will have moved on by then.
DRAINING_RETRY_AFTER_S = 5
#: ``Retry-After`` of an early shed (the planner says the deployment is past its budget).
SHED_RETRY_AFTER_S = 2


class Admission:
    """Counts the generations admitted and not yet ended; refuses past ``max_inflight`` or while draining.

    Attributes:
        max_inflight: most generations (choices) in flight at once; None: no limit.
        is_draining: True once the server is shutting down (read, never set, here).
    """

    def __init__(self, max_inflight: int | None, is_draining: Callable[[], bool]) -> None:
        if max_inflight is not None and max_inflight < 1:
            raise ValueError(f"max_inflight must be None (no limit) or ≥ 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self.is_draining = is_draining
        self._num_inflight = 0
        #: set by the SLO planner when the deployment is past its budget: refuse early above it
        self.shed_above: int | None = None
        self.num_shed = 0
        self._idle_waiters: list[asyncio.Future[None]] = []  # futures, not an Event: no loop bound at init

    @property
    def inflight(self) -> int:
        """Generations admitted and not yet ended."""
        return self._num_inflight

    def check(self) -> None:
        """Raise the 503/429 a new request would get now; O(1), touches nothing."""
        if self.is_draining():
            raise APIError(
                503,
                "The server is shutting down and takes no new requests; retry on another instance.",
                code="server_shutting_down",
                headers={"Retry-After": str(DRAINING_RETRY_AFTER_S)},
            )
        if self.max_inflight is not None and self._num_inflight >= self.max_inflight:
            raise self._overloaded()
        if self.shed_above is not None and self._num_inflight >= self.shed_above:
            self.num_shed += 1
            raise APIError(
                429,
                "The deployment is past the capacity its planner can give; retry later.",
                code="deployment_over_capacity",
                headers={"Retry-After": str(SHED_RETRY_AFTER_S)},
            )

    def admit(self, num_choices: int, param: str = "n") -> Ticket:
        """Take ``num_choices`` slots, or raise 503 (draining), 429 (full) or 400 (can never fit).

        ``param`` is named by the 400: the field that made the request too large.
        """
        if self.max_inflight is not None and num_choices > self.max_inflight:
            raise APIError(
                400,
                f"The request asks for {num_choices} generations (prompts × n) at once, more than this "
                f"server's limit of {self.max_inflight}; send fewer prompts or a smaller n.",
                param=param,
            )
        self.check()
        if self.max_inflight is not None and self._num_inflight + num_choices > self.max_inflight:
            raise self._overloaded()
        self._num_inflight += num_choices
        return Ticket(self, num_choices)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted generation is left; False if ``timeout_s`` passed first."""
        if self._num_inflight == 0:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        try:
            with anyio.move_on_after(timeout_s):
                await waiter
        finally:
            if waiter in self._idle_waiters:
                self._idle_waiters.remove(waiter)
        return self._num_inflight == 0

    def _release(self, num_choices: int) -> None:
        self._num_inflight -= num_choices
        assert self._num_inflight >= 0, "more slots released than admitted"
        if self._num_inflight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _overloaded(self) -> APIError:
        logger.debug("refused a request: %d generations in flight", self._num_inflight)
        return APIError(
            429,
            f"The server is at its limit of {self.max_inflight} concurrent generations; "
            f"retry in {OVERLOADED_RETRY_AFTER_S} s.",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)},
        )


class Ticket:
    """The slots of one admitted request; release once its generations have ended."""

    def __init__(self, admission: Admission, num_choices: int) -> None:
        self.num_choices = num_choices
        self._admission: Admission | None = admission

    def release(self) -> None:
        """Give the slots back; later calls do nothing."""
        if self._admission is not None:
            admission, self._admission = self._admission, None
            admission._release(self.num_choices)
