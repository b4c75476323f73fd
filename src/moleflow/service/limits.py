"""Request-size and in-flight limits of the service, as a pure ASGI middleware (nothing reads the body).

For every request that carries a body (anything but GET, HEAD, OPTIONS):
- a Content-Length over `max_request_bytes` is answered 413 at once, before a byte of the body is read;
- a body without Content-Length (chunked) is counted as it streams and cut with a 413 at the limit;
- when `max_in_flight` uploads are already being received or scored, the request is answered 503 with
  Retry-After at once, without reading its body: uploads queue at the client, never in the server's
  memory, and GET routes (/health, /tasks, the page) never wait behind them.

Refusals carry `Connection: close` so the server drops the unread body instead of reading it through.
Timeouts of slow clients are the HTTP protocol's business (timeouts.py), not this middleware's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class InFlight:
    """The uploads being received or scored now; /health shows the count (one event loop: no lock)."""

    limit: int
    count: int = 0


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser has refused such a request already
    return None


async def refuse(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A JSON error answer like FastAPI's ({"detail": ...}), closing the connection after it."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _too_large(limit: int) -> str:
    return (f"the request is larger than the limit of {limit} bytes (moleflow serve --max-request-mb); "
            "send fewer or smaller images per request")


class UploadLimits:
    def __init__(self, app, max_request_bytes: int, in_flight: InFlight) -> None:
        self.app, self.max_request_bytes, self.in_flight = app, max_request_bytes, in_flight

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS:
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_request_bytes:
            await refuse(send, 413, _too_large(self.max_request_bytes))
            return
        gate = self.in_flight
        if gate.count >= gate.limit:
            await refuse(send, 503, f"the service is receiving or scoring {gate.count} uploads already "
                         "(moleflow serve --max-uploads-in-flight); retry in a moment", [(b"retry-after", b"1")])
            return
        gate.count += 1
        try:
            await self._counted(scope, receive, send)
        finally:
            gate.count -= 1

    async def _counted(self, scope, receive, send) -> None:
        """The app with the body counted as it streams: past the limit the client gets the 413, and the
        app sees a disconnected client (whatever it answers then is dropped)."""
        received, cut, started = 0, False, False

        async def counting_receive():
            nonlocal received, cut
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request" and not cut:
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    cut = True
                    if not started:
                        await refuse(send, 413, _too_large(self.max_request_bytes))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if cut:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
