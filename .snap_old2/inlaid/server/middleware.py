"""Pure-ASGI guard in front of the app: API-key check and request-body size limit.

Invariants:
- With an API key set, every path except ``/health`` needs
  ``Authorization: Bearer <key>`` (compared in constant time); otherwise 401.
- A body larger than ``max_body_bytes`` gets 413, whether the size is declared
  in Content-Length or only discovered while streaming the body. The rest of an
  oversized body is read and discarded (up to a hard cap) so the client reads
  the 413 instead of a reset connection.
- The app downstream receives the whole (small) body in one message; later
  ``receive()`` calls reach the client connection (so disconnects are seen).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Awaitable, Callable

from inlaid.server.errors import error_bytes

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
_DISCARD_CAP = 64 << 20


async def send_error(send: Send, status: int, message: str, code: str, extra_headers: list | None = None) -> None:
    """Send a complete OpenAI-style JSON error response."""
    body = error_bytes(status, message, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra_headers or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardMiddleware:
    """API key + body size limit, before any routing or parsing."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())  # type: ignore[union-attr]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            await send_error(
                send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None when a response was already sent (413) or the client left."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        more = True
        while more and not too_big:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            too_big = size > self.max_body_bytes
            chunks.append(chunk)
        if too_big:
            await self._discard(receive, more, size)
            await send_error(
                send, 413, f"request body is larger than the limit of {self.max_body_bytes} bytes", "body_too_large"
            )
            return None
        return b"".join(chunks)

    async def _discard(self, receive: Receive, more: bool, size: int) -> None:
        while more and size < _DISCARD_CAP:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
