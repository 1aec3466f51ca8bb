"""Asking every worker for its counters (``GetStats``) and waiting for the answers.

The dispatcher's receive loop hands each ``WorkerStats`` to :meth:`StatsRequests.answer`;
:meth:`StatsRequests.ask` waits, up to a timeout, for the answers of the workers it asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from pdserve.worker import protocol as p


class StatsRequests:
    """Pending ``GetStats`` requests, by worker."""

    def __init__(self, send: Callable[[str, p.Message], object]) -> None:
        self.send = send
        self._waiters: dict[str, list[asyncio.Future[p.WorkerStats]]] = {}

    async def ask(self, worker_ids: Iterable[str], timeout_s: float = 2.0) -> list[p.WorkerStats]:
        """Ask these workers for their counters; the answers that came within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        futures = []
        for wid in worker_ids:
            fut: asyncio.Future[p.WorkerStats] = loop.create_future()
            self._waiters.setdefault(wid, []).append(fut)
            futures.append(fut)
            self.send(wid, p.GetStats())
        if not futures:
            return []
        done, _ = await asyncio.wait(futures, timeout=timeout_s)
        return [f.result() for f in futures if f in done]

    def answer(self, m: p.WorkerStats) -> None:
        """A worker's counters arrived: wake whoever asked."""
        for fut in self._waiters.pop(m.worker_id, []):
            if not fut.done():
                fut.set_result(m)
