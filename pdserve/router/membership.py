"""Workers joining the router, and their peers told when one's KV endpoint is gone.

A ``Register`` message is admitted in steps:

1. With a cluster secret set, the worker must present the same one; and it
   must serve the router's model. Otherwise the registration is dropped with
   a warning in the router's log.
2. The placer may refuse it (a cache index the worker cannot share): the
   worker is told why with ``RegisterRefused``.
3. A worker registering again with another KV endpoint changed roles: the
   prefill and mixed workers forget its old cache (``PeerLost``).
4. It enters the registry and gets ``Registered`` with its heartbeat
   interval, a sixth of the lease.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

from pdserve.config import Role
from pdserve.router.dispatch_config import DispatcherConfig
from pdserve.router.placement import Placer
from pdserve.router.registry import Registry, WorkerInfo
from pdserve.worker import protocol as p

logger = logging.getLogger(__name__)


class Membership:
    """Admits registering workers into the registry; tells peers of a lost KV endpoint."""

    def __init__(
        self,
        config: DispatcherConfig,
        model_name: str,
        registry: Registry,
        placer: Placer,
        send: Callable[[str, p.Message], object],
    ) -> None:
        self.config = config
        self.model_name = model_name
        self.registry = registry
        self.placer = placer
        self.send = send

    def on_register(self, sender: str, m: p.Register) -> None:
        """Admit or refuse a worker's ``Register`` (the steps in the module docstring)."""
        if self.config.secret and not hmac.compare_digest(m.secret.encode(), self.config.secret.encode()):
            logger.warning("router: registration of %s refused: wrong cluster secret", m.worker_id)
            return
        if m.model != self.model_name:
            logger.warning("router: %s serves %s, not %s; refused", m.worker_id, m.model, self.model_name)
            return
        refusal = self.placer.on_register(m)
        if refusal is not None:
            logger.error("router: registration of %s refused: %s", m.worker_id, refusal)
            self.send(sender, p.RegisterRefused(refusal))
            return
        old = self.registry.get(m.worker_id)
        if old is not None and old.kv is not None and old.kv != m.kv:
            self.peer_lost(m.worker_id, (Role.PREFILL, Role.MIXED))  # it flipped: drop its old cache
        self.registry.add(WorkerInfo.from_register(m))
        self.send(sender, p.Registered(m.worker_id, self.config.lease_s / 6))
        logger.info("router: %s worker %s registered (pid %d)", m.role, m.worker_id, m.pid)

    def peer_lost(self, worker_id: str, roles: tuple[Role, ...]) -> None:
        """Tell the other workers of these roles that ``worker_id``'s KV endpoint is gone."""
        for w in self.registry.all():
            if w.role in roles and w.worker_id != worker_id:
                self.send(w.worker_id, p.PeerLost(worker_id))
