"""Draining (503): on shutdown new requests are refused while the ones in flight finish.

Shared fakes: tests/router_gated.py (a backend that holds generations open until released).
"""

from __future__ import annotations

import asyncio

import pytest
from router_gated import (
    AUTH,
    KEY,
    CountingTokenizer,
    GatedBackend,
    OpenStream,
    assert_error,
    chat,
    completion,
    make_app,
    served,
)

from pdserve.router.admission import Admission

pytestmark = pytest.mark.anyio


# -- draining --------------------------------------------------------------------------------


async def test_draining_refuses_new_requests_and_finishes_old_ones(
    backend: GatedBackend, tokenizer: CountingTokenizer
) -> None:
    app = make_app(backend, tokenizer, api_keys=[KEY], max_inflight=10)
    admission: Admission = app.state.admission
    async with served(app) as c:
        assert (await c.get("/ready")).status_code == 200
        stream = await OpenStream(c, completion(stream=True), AUTH).open()
        app.state.draining = True  # what the server does on SIGTERM

        r = await c.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        assert (await c.get("/live")).status_code == 200 and (await c.get("/health")).status_code == 200
        for path, body in [("/v1/completions", completion()), ("/v1/chat/completions", chat(stream=True))]:
            r = await c.post(path, json=body, headers=AUTH)
            assert_error(r, 503, "server_shutting_down", "server_error")
            assert int(r.headers["retry-after"]) >= 1
        assert len(backend.calls) == 1 and admission.inflight == 1
        assert not await admission.wait_idle(0.05)  # the stream still runs

        waiter = asyncio.create_task(admission.wait_idle(5))
        backend.release.set()
        assert await stream.finish() == "az"  # the in-flight stream ended normally
        assert await waiter and admission.inflight == 0
        assert backend.aborted == []
