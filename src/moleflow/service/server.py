"""uvicorn as the service runs it: HTTP/1.1 (h11) with header and body timeouts.

uvicorn closes idle kept-alive connections (`timeout_keep_alive`) but waits forever for a request's
headers and for a body that stops coming: a client trickling its headers byte by byte, or sending a
Content-Length larger than its body, would hold a connection (and an upload slot) for good.
`TimedH11Protocol` is uvicorn's own H11Protocol with two timers:

- the header timer starts when a connection opens, or when the first bytes of a further request arrive
  on a kept-alive one, and stops when the request line and headers are complete; when it fires, the
  connection is closed (with a 408 if part of a request had arrived);
- the body timer runs while a body is being received and restarts with every chunk, so it is the longest
  silence between two reads (nginx's client_body_timeout), not a bound on the whole transfer, which would
  cut large uploads over slow links; when it fires, the client gets a 408 and the connection closes. Time
  in which the server itself stopped reading (its buffer full, the app behind) does not count.

It relies on H11Protocol's hooks (connection_made, data_received, on_response_complete,
connection_lost), its h11 connection `conn` and its request cycle; tests/test_service_hostile.py fails
if a uvicorn release changes them. The h11 protocol is chosen explicitly (never httptools) for that.
"""
from __future__ import annotations

import asyncio
import json

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def _answer_408(detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


class TimedH11Protocol(H11Protocol):
    header_timeout: float = 10.0  # set by timed_protocol()
    body_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm(after_response=False)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm(after_response=False)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm(after_response=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header()
        self._cancel_body()
        super().connection_lost(exc)

    def _arm(self, after_response: bool) -> None:
        """Which timer runs follows h11's view of the client: IDLE = headers incomplete, SEND_BODY =
        body incomplete, anything else = nothing awaited from it."""
        state = self.conn.their_state
        if self.transport.is_closing() or state not in (h11.IDLE, h11.SEND_BODY):
            self._cancel_header()
            self._cancel_body()
        elif state is h11.SEND_BODY:
            self._cancel_header()
            self._cancel_body()
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_timed_out)
        else:
            self._cancel_body()
            # Right after a response the keep-alive timer guards the idle connection; the header timer
            # starts with the next request's first bytes (data_received).
            if self._header_timer is None and not (after_response and not self.conn.trailing_data[0]):
                self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _cancel_header(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it is cut
            self.logger.info("%s: request headers incomplete after %g s; connection closed", self.client, self.header_timeout)
            self.transport.write(_answer_408(f"the request line and headers did not arrive within {self.header_timeout:g} s "
                                             "(moleflow serve --header-timeout)"))
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server stopped reading, not the client sending
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_timed_out)
            return
        self.logger.info("%s: request body stalled for %g s; connection closed", self.client, self.body_timeout)
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(_answer_408(f"the request body stalled: no bytes for {self.body_timeout:g} s "
                                             "(moleflow serve --body-timeout)"))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() now says http.disconnect; its answer is dropped
            cycle.message_event.set()
        self.transport.close()


def timed_protocol(header_timeout: float, body_timeout: float) -> type[TimedH11Protocol]:
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": header_timeout, "body_timeout": body_timeout})


def uvicorn_config(app, cfg, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    """The service's uvicorn settings from its ServiceConfig; `serve` and the tests both use them."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="none", lifespan="on",
                          http=timed_protocol(cfg.header_timeout_s, cfg.body_timeout_s), timeout_keep_alive=cfg.keep_alive_s)
