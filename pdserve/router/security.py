"""API-key authentication of the router's HTTP API.

1. :class:`APIKeys` keeps only the SHA-256 digests of the configured keys, so
   neither its ``repr`` nor a traceback can show one.
2. :class:`APIKeyMiddleware` (pure ASGI, so streaming and disconnect
   detection are untouched) checks ``Authorization: Bearer <key>`` on every
   request except the probes (``/live``, ``/health``, ``/ready``), before any
   route runs or the body is read. A missing or wrong key is a 401 in
   OpenAI's shape (``code: "invalid_api_key"``) with ``WWW-Authenticate: Bearer``.
   Browser pages (``browser_paths``: the dashboard and its data) also accept
   the key as a ``key`` query parameter or a ``pdserve_key`` cookie, because
   a browser cannot send a header when it opens a page; no other route does.
3. The comparison takes the same time whatever the presented key: digests of
   equal length, :func:`hmac.compare_digest`, and every configured key is
   compared (no early exit).

Keys and the ``Authorization`` header are never logged, echoed in an error
message, or put in a response.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.router.errors import APIError

#: Paths that answer without a key: load balancers and orchestrators probe them.
PROBE_PATHS = frozenset({"/live", "/health", "/ready"})

_MISSING_KEY = APIError(
    401,
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    code="invalid_api_key",
    headers={"WWW-Authenticate": "Bearer"},
)
_WRONG_KEY = APIError(
    401,
    "Incorrect API key provided. Check the key this server was started with.",
    code="invalid_api_key",
    headers={"WWW-Authenticate": "Bearer"},
)


class APIKeys:
    """The keys a client may present; holds their digests only."""

    def __init__(self, api_keys: Sequence[str]) -> None:
        if isinstance(api_keys, str | bytes):
            raise TypeError("api_keys must be a sequence of keys, not a single string")
        for i, key in enumerate(api_keys):
            # the message names the position only: the key itself must not reach a log
            if not isinstance(key, str) or not key:
                raise ValueError(f"api_keys[{i}] is empty or not a string")
            if not all("\x21" <= ch <= "\x7e" for ch in key):
                raise ValueError(
                    f"api_keys[{i}] has a character outside printable ASCII without spaces; "
                    "such a key cannot be sent in an Authorization header"
                )
        self._digests = [hashlib.sha256(key.encode("ascii")).digest() for key in api_keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"APIKeys(<{len(self._digests)} key(s)>)"

    def accepts(self, key: bytes) -> bool:
        """True when ``key`` is one of the keys; constant time in the key's value."""
        digest = hashlib.sha256(key).digest()
        accepted = False
        for expected in self._digests:
            accepted |= hmac.compare_digest(digest, expected)
        return accepted


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's first ``Authorization: Bearer`` header, or None."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            return token.strip() or None
    return None


#: The cookie a browser page keeps the key in (see ``browser_token``).
KEY_COOKIE = "pdserve_key"


def browser_token(scope: Scope) -> bytes | None:
    """The key of a browser page request: its ``key`` query parameter, else its ``pdserve_key`` cookie."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("key"):
        return query["key"][0].encode("latin-1") or None
    for name, value in scope.get("headers", ()):
        if name.lower() == b"cookie":
            try:
                morsel = SimpleCookie(value.decode("latin-1")).get(KEY_COOKIE)
            except CookieError:
                return None
            if morsel is not None and morsel.value:
                return morsel.value.encode("latin-1")
    return None


class APIKeyMiddleware:
    """Answers 401 to any request but a probe that lacks a valid bearer key.

    ``browser_paths`` also take the key from a query parameter or cookie (:func:`browser_token`).
    """

    def __init__(self, app: ASGIApp, api_keys: APIKeys, browser_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.api_keys = api_keys
        self.browser_paths = browser_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is None and scope["path"] in self.browser_paths:
            token = browser_token(scope)
        if token is not None and self.api_keys.accepts(token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        error = _MISSING_KEY if token is None else _WRONG_KEY
        await error.response()(scope, receive, send)
