"""The router front end's API keys: every inference route needs one, probes do not, none is ever logged.

Shared fakes: tests/router_gated.py (a backend that holds generations open until released).
"""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry
from router_gated import (
    AUTH,
    KEY,
    OTHER_KEY,
    SECRET_PROMPT,
    WRONG_KEY,
    CountingTokenizer,
    GatedBackend,
    asgi_client,
    assert_error,
    chat,
    completion,
    make_app,
    served,
)

from pdserve.router.security import APIKeys

pytestmark = pytest.mark.anyio


# -- API keys --------------------------------------------------------------------------------

INFERENCE_ROUTES = [
    ("POST", "/v1/completions", completion()),
    ("POST", "/v1/chat/completions", chat()),
    ("POST", "/v1/completions", completion(stream=True)),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize(("method", "path", "body"), INFERENCE_ROUTES)
async def test_inference_routes_need_a_valid_key(
    backend: GatedBackend, tokenizer: CountingTokenizer, method: str, path: str, body: dict | None
) -> None:
    backend.release.set()
    app = make_app(backend, tokenizer, api_keys=[KEY, OTHER_KEY])
    async with asgi_client(app) as c:
        refused = [
            {},
            {"Authorization": f"Bearer {WRONG_KEY}"},
            {"Authorization": f"Bearer {KEY}x"},  # a prefix of a valid key is not it
            {"Authorization": f"Bearer {KEY[:-1]}"},
            {"Authorization": f"Basic {KEY}"},  # right secret, wrong scheme
            {"Authorization": "Bearer"},
            {"X-Api-Key": KEY},
        ]
        for headers in refused:
            r = await c.request(method, path, json=body, headers=headers)
            error = assert_error(r, 401, "invalid_api_key", "invalid_request_error")
            assert r.headers["www-authenticate"] == "Bearer"
            assert KEY not in r.text and WRONG_KEY not in r.text and KEY not in str(r.headers)
            assert "Bearer" in error["message"] or "Incorrect" in error["message"]
        assert backend.calls == [] and tokenizer.num_encodes == 0  # nothing ran for them

        for key in (KEY, OTHER_KEY, f"  {KEY} "):
            for scheme in ("Bearer", "bearer"):
                r = await c.request(method, path, json=body, headers={"Authorization": f"{scheme} {key}"})
                assert r.status_code == 200, r.text
                assert KEY not in r.text and OTHER_KEY not in r.text
    assert app.state.admission.inflight == 0


async def test_unknown_routes_need_a_key_too(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    async with asgi_client(make_app(backend, tokenizer, api_keys=[KEY])) as c:
        assert_error(await c.get("/v1/nothing"), 401, "invalid_api_key", "invalid_request_error")
        assert_error(await c.get("/pdserve/anything"), 401, "invalid_api_key", "invalid_request_error")
        assert (await c.get("/v1/nothing", headers=AUTH)).status_code == 404


async def test_refused_keys_are_counted(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    registry = CollectorRegistry()
    async with asgi_client(make_app(backend, tokenizer, api_keys=[KEY], registry=registry)) as c:
        for _ in range(2):
            assert (await c.post("/v1/completions", json={"prompt": "x"})).status_code == 401
        assert (await c.get("/live")).status_code == 200
    count = registry.get_sample_value
    assert count("pdserve_http_responses_total", {"endpoint": "/v1/completions", "status": "401"}) == 2
    assert count("pdserve_http_responses_total", {"endpoint": "/live", "status": "200"}) == 1


async def test_probes_answer_without_a_key(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    async with asgi_client(make_app(backend, tokenizer, api_keys=[KEY])) as c:
        for path in ("/live", "/health", "/ready"):
            r = await c.get(path)
            assert r.status_code == 200, (path, r.text)
        backend.ready = False
        assert (await c.get("/ready")).status_code == 503
        assert (await c.get("/live")).status_code == 200  # no backend check


async def test_no_keys_means_no_auth(backend: GatedBackend, tokenizer: CountingTokenizer) -> None:
    backend.release.set()
    async with asgi_client(make_app(backend, tokenizer)) as c:
        assert (await c.post("/v1/completions", json=completion())).status_code == 200
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer anything"})).status_code == 200


def test_bad_key_configuration_is_refused_without_echoing_the_key() -> None:
    with pytest.raises(TypeError):
        APIKeys(KEY)  # one string is not a list of one-character keys
    for bad in ("", "has space", "tab\there", "ключ"):
        with pytest.raises(ValueError, match=r"api_keys\[1\]") as info:
            APIKeys([KEY, bad])
        assert (bad or "\x00") not in str(info.value) and KEY not in str(info.value)
    keys = APIKeys([KEY])
    assert KEY not in repr(keys) and KEY not in str(vars(keys))
    assert keys.accepts(KEY.encode()) and not keys.accepts(WRONG_KEY.encode())
    assert not APIKeys([]) and bool(keys)


async def test_key_and_prompt_never_logged(
    backend: GatedBackend, tokenizer: CountingTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing the router logs, at any level, holds a key, the Authorization header or prompt text."""
    app = make_app(backend, tokenizer, api_keys=[KEY])
    with caplog.at_level(logging.DEBUG):
        async with served(app) as c:
            await c.post("/v1/completions", json=completion(prompt=SECRET_PROMPT))  # no key
            await c.post(
                "/v1/completions",
                json=completion(prompt=SECRET_PROMPT),
                headers={"Authorization": f"Bearer {WRONG_KEY}"},
            )
            backend.release.set()
            r = await c.post("/v1/completions", json=completion(prompt=SECRET_PROMPT), headers=AUTH)
            assert r.status_code == 200
            r = await c.post(
                "/v1/chat/completions",
                headers=AUTH,
                json=chat(stream=True, messages=[{"role": "user", "content": SECRET_PROMPT}]),
            )
            assert r.status_code == 200
            backend.error = RuntimeError("internal failure")  # logged at ERROR with a traceback
            r = await c.post("/v1/completions", json=completion(prompt=SECRET_PROMPT), headers=AUTH)
            assert r.status_code == 500
    # the test's own HTTP client logs too; only the server side is checked
    records = [rec for rec in caplog.records if not rec.name.startswith(("httpx", "httpcore"))]
    assert any(rec.levelno >= logging.ERROR for rec in records)  # the check saw real log output
    assert any(rec.name.startswith("pdserve") and rec.levelno == logging.DEBUG for rec in records)
    text = "\n".join(caplog.handler.format(rec) for rec in records)
    for secret in (KEY, WRONG_KEY, SECRET_PROMPT, "Bearer", "authorization", "Authorization"):
        assert secret not in text, secret
    assert app.state.admission.inflight == 0
