"""Fixtures for the router front end's tests against the scripted backend (tests/router_fakes.py).

Every module here runs on anyio's pytest plugin (``pytestmark = pytest.mark.anyio``) with asyncio,
and gets a fresh :class:`FakeBackend` and an in-process HTTP client to an app serving it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from router_fakes import FakeBackend, asgi_client


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def client(backend: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(backend) as c:
        yield c
