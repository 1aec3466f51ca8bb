"""The router's end of the control connection to every worker: one ZeroMQ ROUTER socket.

Workers connect DEALER sockets whose identity is their worker id, so a
message is addressed by worker id. Lifecycle:

1. ``bind``: listen (the actual endpoint is returned: port 0 picks one).
2. ``run``: receive forever; each decodable message goes to ``on_message``
   with its sender's id (undecodable ones are logged and dropped, and an
   exception in the handler never stops the loop).
3. ``send``: never waits. A worker whose connection is gone (or who never
   connected) is reported to ``on_unreachable``, once per failed send, on the
   next turn of the event loop.
4. ``close``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import zmq
import zmq.asyncio

from pdserve.worker import protocol as p

logger = logging.getLogger(__name__)


class WorkerChannel:
    """Typed messages to and from workers over one ROUTER socket."""

    def __init__(
        self,
        on_message: Callable[[str, p.Message], None],
        on_unreachable: Callable[[str], None],
    ) -> None:
        self._on_message = on_message
        self._on_unreachable = on_unreachable
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Transport-level liveness: a peer whose ZeroMQ stops answering for 3 s is
        # disconnected, so the next send to it fails even if its host vanished silently.
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)

    def bind(self, endpoint: str) -> str:
        """Listen on ``endpoint`` (``tcp://HOST:PORT``); returns the endpoint actually bound."""
        self._sock.bind(endpoint)
        return str(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))

    async def run(self) -> None:
        """Receive and dispatch messages until cancelled."""
        while True:
            ident, data = await self._sock.recv_multipart()
            try:
                message = p.decode(data)
            except Exception:
                logger.warning("router: undecodable message dropped")
                continue
            try:
                self._on_message(ident.decode(), message)
            except Exception:
                logger.exception("router: error handling %s", type(message).__name__)

    def send(self, worker_id: str, message: p.Message) -> bool:
        """Send without waiting; False when the worker's connection is known to be gone.

        With ROUTER_MANDATORY an unknown or disconnected peer makes the send fail
        with EHOSTUNREACH; zmq.asyncio reports that through the returned future,
        which is already done when the failure is immediate.
        """
        sent = cast(
            asyncio.Future[object], self._sock.send_multipart([worker_id.encode(), p.encode(message)])
        )
        if sent.done():
            if sent.exception() is not None:
                self._unreachable(worker_id, sent.exception())
                return False
            return True

        def on_done(fut: asyncio.Future[object]) -> None:
            if fut.exception() is not None:
                self._unreachable(worker_id, fut.exception())

        sent.add_done_callback(on_done)
        return True

    def close(self) -> None:
        """Close the socket at once (unsent messages are dropped)."""
        self._sock.close(0)
        self._ctx.term()

    def _unreachable(self, worker_id: str, exc: BaseException | None) -> None:
        logger.debug("router: cannot reach worker %s: %s", worker_id, exc)
        # Deferred: the caller may be in the middle of placing an attempt on this
        # worker; once that attempt is recorded, losing the worker retries it too.
        asyncio.get_running_loop().call_soon(self._on_unreachable, worker_id)
