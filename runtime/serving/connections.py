"""uvicorn's h11 protocol with what a server on a network needs against slow or greedy clients.

uvicorn bounds the header size (`h11_max_incomplete_event_size`) and idle kept-alive connections
(`timeout_keep_alive`), but not how long headers may take to arrive nor how many connections are
open: 1,100 clients sending headers a byte at a time would hold every file descriptor. This
protocol adds a header deadline (408, then close) and a connection cap (503, then close), logs
both refusals (at most once a second, with a count) and answers an over-long header block with
431 rather than a bare 400. Refusals are OpenAI's error JSON, as every other error of the server.

Nor does uvicorn bound how long an answer waits on a client that reads none of it: its `send`
waits for the socket's buffers to drain, for as long as the client holds the connection, with the
request counted in flight (a SIGTERM drain would wait for it, then uvicorn cancel it with a
traceback). Here writing that stays paused for the send timeout closes the connection: the route
sees a client that left, as if it had disconnected, and its request is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServeSettings

log = logging.getLogger("jfexport.serve")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


def _raw_error(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response, for a connection that has sent no complete request to answer."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                                 "param": None, "code": code}}).encode()
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
            % (status, _REASONS[status], len(body)))
    if status == 503:
        head += b"retry-after: 1\r\n"
    return head + b"\r\n" + body


# How long a refused connection stays half-open after its answer: closing a socket with unread input
# resets it, and the reset can overtake the answer in flight; reading for a moment first lets it land.
LINGER_S = 1.0


def _answer_and_close(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, response: bytes) -> None:
    transport.write(response)
    if transport.can_write_eof():
        transport.write_eof()
        loop.call_later(LINGER_S, transport.close)
    else:
        transport.close()


class _RateLimitedLog:
    """One warning a second at most, counting what happened in between (a flood must not flood the log)."""

    def __init__(self, what: str):
        self.what = what
        self.count = 0
        self.last = 0.0

    def __call__(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= 1.0:
            log.warning("%s (%d since the last report)", self.what, self.count)
            self.count, self.last = 0, now


def guarded_protocol(settings: ServeSettings,
                     count_refusal: Callable[[str], None] = lambda code: None) -> type[H11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with the settings' header timeout and connection cap.
    `count_refusal(code)` is told of every error it answers itself (no route sees them), for the metrics."""

    def refuse(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, status: int, message: str,
               code: str) -> None:
        count_refusal(code)
        _answer_and_close(loop, transport, _raw_error(status, message, code))

    refused_log = _RateLimitedLog(f"refused a connection: {settings.max_connections} are open (the connection cap)")
    slow_log = _RateLimitedLog(f"closed a connection whose request headers took over {settings.header_timeout:g} s")
    stalled_log = _RateLimitedLog(f"closed a connection whose client read none of its answer for "
                                  f"{settings.send_timeout:g} s")

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._stall_timer: asyncio.TimerHandle | None = None  # armed while writing is paused
            self._refused = False  # answered with an error: what the client still sends is dropped

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= settings.max_connections:
                refused_log()
                self._refused = True
                refuse(self.loop, transport, 503,
                       f"the server holds {settings.max_connections} connections, its most; retry later",
                       "too_many_connections")
                return
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request's headers are in
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # The next request's headers on this kept-alive connection get the same deadline.
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.transport is None:  # refused in connection_made: uvicorn never saw it
                return
            self._refused = True
            self._disarm_header_timer()
            self._disarm_stall_timer()
            super().connection_lost(exc)
            # A `send` waiting for the buffers to drain would wait for ever: the transport reports no
            # drain once closed. Woken, it finds the cycle disconnected and returns.
            self.flow.resume_writing()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall_timer is None:
                self._stall_timer = self.loop.call_later(settings.send_timeout, self._client_not_reading)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._disarm_stall_timer()

        def shutdown(self) -> None:
            # The server is stopping (its drain is over): an answer stuck on a client that does not read
            # is not waited for (uvicorn would cancel its task, with a traceback, a second later).
            if self._stall_timer is not None:
                self.transport.abort()
                return
            super().shutdown()

        def _client_not_reading(self) -> None:
            self._stall_timer = None
            stalled_log()
            self.transport.abort()  # close() would wait to flush what the client does not read

        def _disarm_stall_timer(self) -> None:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None

        def send_400_response(self, msg: str) -> None:
            self._disarm_header_timer()
            self._refused = True
            if len(self.conn.trailing_data[0]) > settings.max_header_bytes:
                refuse(self.loop, self.transport, 431,
                       f"the request's headers are larger than {settings.max_header_bytes} bytes", "headers_too_large")
            else:
                refuse(self.loop, self.transport, 400, "invalid HTTP request", "invalid_http")

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(settings.header_timeout, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            slow_log()
            self._refused = True
            refuse(self.loop, self.transport, 408,
                   f"the request's headers did not arrive within {settings.header_timeout:g} s", "header_timeout")

    return GuardedH11Protocol
