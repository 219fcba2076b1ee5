"""What every HTTP request meets before a handler runs, and the connection-level limits.

`Guard` (plain ASGI middleware):
- Host and Origin: on a server bound to loopback, a request whose `Host` is not a loopback name (DNS
  rebinding), or whose `Origin` is not a loopback origin (another web page), is refused with 403;
- API key on every `/v1` route when one is set: `Authorization: Bearer KEY`, compared in constant time; a
  401 carries `WWW-Authenticate: Bearer`;
- a POST body must be `application/json` (415: a cross-site form cannot send it without a preflight),
  no larger than `max_body_bytes` (413), and fully received within `body_timeout_s` (408);
- the body is read here, once, and replayed to the app; after it, the app's `receive` still reports a
  client that went away (`http.disconnect`).

`GuardedH11Protocol`: uvicorn's HTTP/1.1 protocol with a deadline for a request's headers (a client that
sends them a byte at a time, or never finishes them, is dropped after `header_timeout_s`).
"""

from __future__ import annotations

import asyncio
import hmac
from urllib.parse import urlsplit

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError

LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _hostname(value: str) -> str:
    """`host[:port]` (or `[v6]:port`) -> the host name, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    def __init__(self, app, settings):
        self.app, self.s = app, settings

    async def _refuse(self, send, e: APIError) -> None:
        status, headers, body = e.raw()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _check(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.s.exposed:
            host = _hostname(headers.get("host", "localhost"))
            if host not in LOOPBACK:
                return APIError(403, f"host {host!r} is not served here (this server answers on loopback only)",
                                code="host_not_allowed")
            origin = headers.get("origin")
            if origin and origin != "null" and _hostname(urlsplit(origin).netloc) not in LOOPBACK:
                return APIError(403, f"requests from the web origin {origin!r} are not allowed", code="origin_not_allowed")
        path = scope.get("path", "")
        if path.startswith("/v1/") and self.s.api_key:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.s.api_key}".encode()):
                return APIError(401, "missing or wrong API key", code="invalid_api_key",
                                headers={"WWW-Authenticate": 'Bearer realm="diffusiongemma"'})
        if scope.get("method") == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return APIError(415, f"the body must be application/json, got {kind or 'no content type'!r}",
                                code="unsupported_media_type")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.s.max_body_bytes):
                return APIError(413, f"request body of {length} bytes exceeds the limit of {self.s.max_body_bytes}",
                                code="request_too_large")
        return None

    async def _read_body(self, receive) -> bytes:
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.body_timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.s.body_timeout_s:g} s",
                               code="request_timeout") from None
            if msg["type"] == "http.disconnect":
                raise ConnectionAbortedError
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.s.max_body_bytes:
                raise APIError(413, f"request body exceeds the limit of {self.s.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self._check(scope)
        if problem is not None:
            return await self._refuse(send, problem)
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(receive)
        except APIError as e:
            return await self._refuse(send, e)
        except ConnectionAbortedError:
            return
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, when it comes

        return await self.app(scope, replay, send)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's headers (not reset by trickled bytes)."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        task = getattr(self, "_header_deadline", None)
        if task is not None:
            task.cancel()
        self._header_deadline = None

    def _headers_too_slow(self) -> None:
        if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the headers are in: the body has its own deadline (Guard)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
