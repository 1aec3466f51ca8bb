"""Fixtures for the router front end's security and admission tests (tests/router_gated.py).

Every module here runs on anyio's pytest plugin (``pytestmark = pytest.mark.anyio``) with asyncio,
and gets a fresh :class:`GatedBackend` (generations held open until released) and a
:class:`CountingTokenizer`; each test builds the app it needs with ``make_app``.
"""

from __future__ import annotations

import pytest
from router_gated import CountingTokenizer, GatedBackend


@pytest.fixture
def backend() -> GatedBackend:
    return GatedBackend()


@pytest.fixture
def tokenizer() -> CountingTokenizer:
    return CountingTokenizer()
