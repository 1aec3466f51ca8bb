"""How the supervisor talks to the router: one sync call (see :mod:`pdserve.router.deployment`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

logger = logging.getLogger(__name__)

#: One sync with the router: (router base URL, report) -> its answer, or None if unreachable.
RouterLink = Callable[[str, dict[str, Any]], "dict[str, Any] | None"]


class HttpLink:
    """The real :data:`RouterLink`: ``POST /pdserve/supervisor`` with the cluster secret."""

    def __init__(self, secret: str, api_key: str = "") -> None:
        self._headers = {"X-PDServe-Cluster-Secret": secret}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(timeout=5.0)

    def __call__(self, url: str, body: dict[str, Any]) -> dict[str, Any] | None:
        try:
            reply = self._client.post(f"{url}/pdserve/supervisor", json=body, headers=self._headers)
            reply.raise_for_status()
            data: dict[str, Any] = reply.json()
            return data
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("sync with the router failed: %s", exc)
            return None

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()
