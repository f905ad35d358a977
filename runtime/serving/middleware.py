"""The ASGI layer around the routes: request ids, body size and time limits, in-flight count, the
last-resort 500, access log.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that streamed answers pass through unbuffered
and a client's disconnect still reaches the route.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from urllib.parse import quote

from .errors import APIError, api_error_from
from .service import Service

access_log = logging.getLogger("jfexport.access")
log = logging.getLogger("jfexport.serve")

# What the access log takes from the client is kept to characters that cannot start a line or a field of
# its own: a request id of other characters (a space, `=`, a control character) is replaced by one of
# ours, and the path, which the server has percent-decoded (`%0A` is a newline), is encoded again.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+-]{1,64}")
_LOGGED_PATH = 256

# Routes that run the model: counted in flight (the SIGTERM drain waits for them) and logged.
MODEL_ROUTES = {"/v1/chat/completions": "chat", "/v1/images/generations": "image"}


class ServingMiddleware:
    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, kind=MODEL_ROUTES.get(scope["path"], "other"), rows=0)
        extra_headers = [(b"x-request-id", request_id.encode("latin-1")),
                         (b"x-jfexport-replica", self.service.replica_id.encode("latin-1"))]
        start = time.perf_counter()
        status = [0]
        answered, client_left = [False], [False]  # the last body part sent; the client's disconnect read

        async def send_with_headers(message):
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered[0] = True
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [*message.get("headers", []), *extra_headers]
                # After a bug the connection's state is not trusted: the client is told to open a new one
                # rather than finding this one reset under its next request.
                if status[0] == 500 and (b"connection", b"close") not in headers:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        async def watched_receive():
            message = await receive()
            if message["type"] == "http.disconnect":
                client_left[0] = True
            return message

        model_route = scope["path"] in MODEL_ROUTES
        if model_route and self.service.draining:
            # Decided on arrival: a request counted in flight below is one the drain waits for.
            await self._send_error(send_with_headers, self.service.draining_error())
            self.service.request_refused(state["kind"], 503)
            return self._log(scope, state, 503, start)
        if model_route:  # counted from its arrival: the drain waits for a body still arriving too
            self.service.request_started()
        try:
            app_receive = watched_receive
            if scope["method"] == "POST":
                app_receive = await self._buffered_body(watched_receive, headers, send_with_headers)
                if app_receive is None:
                    return
            await self.app(scope, app_receive, send_with_headers)
        except Exception as exc:
            # Answered here, not by Starlette's last-resort handler, which answers and then re-raises to
            # uvicorn: that drops the connection and leaves the status unknown (logged as 499).
            log.error("request %s failed", request_id, exc_info=exc)
            if status[0]:  # the answer had begun (a stream): nothing to add, the connection ends
                status[0] = 500
            else:
                await self._send_error(send_with_headers, api_error_from(exc))
        finally:
            # A stream its client left before its end was cancelled, not answered: 499, as a request the
            # client left before its answer began.
            final = 499 if not status[0] or (client_left[0] and not answered[0]) else status[0]
            if model_route:
                self.service.request_finished(state["kind"], final, time.perf_counter() - start)
            self._log(scope, state, final, start)

    async def _buffered_body(self, receive, headers, send):
        """Read the whole body up to the limit (413 past it), then replay it to the route."""
        settings = self.service.settings
        limit = settings.max_body_bytes
        declared = headers.get(b"content-length")
        chunks, size, more = [], 0, True
        if declared is not None and declared.isdigit() and int(declared) > limit:
            more = False
            size = int(declared)
        deadline = time.monotonic() + settings.body_timeout
        aborted = self.service.until_aborted()  # a drain past its grace stops waiting for the body too
        while more:
            receiving = asyncio.ensure_future(receive())
            done, _ = await asyncio.wait({receiving, aborted}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if receiving not in done:
                receiving.cancel()
                await self._send_error(send, self.service.aborted_error() if aborted.done() else APIError(
                    408, f"the request body did not arrive within {settings.body_timeout:g} s", param="body",
                    code="body_timeout"))
                return None
            message = receiving.result()
            if message["type"] == "http.disconnect":
                return _replay(message, receive)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False) and size <= limit
        if size > limit:
            await self._send_error(send, APIError(413, f"the request body is larger than {limit} bytes", param="body",
                                                  code="body_too_large"))
            return None
        return _replay({"type": "http.request", "body": b"".join(chunks), "more_body": False}, receive)

    async def _send_error(self, send, error: APIError) -> None:
        """An error answered before the app saw the request (its body unread: the connection closes)."""
        self.service.count_error(error)
        body = error.json()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *((k.lower().encode(), v.encode()) for k, v in error.headers().items())]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _log(self, scope, state, status: int, start: float) -> None:
        path = quote(scope["path"], safe="/!$&'()*+,;=:@-._~")
        if len(path) > _LOGGED_PATH:
            path = path[:_LOGGED_PATH] + "..."
        access_log.info("request_id=%s %s %s status=%d kind=%s rows=%d latency_ms=%.1f", state["request_id"],
                        scope["method"], path, status, state["kind"], state.get("rows", 0),
                        (time.perf_counter() - start) * 1e3)


def _replay(first_message, receive):
    """A receive that returns the buffered body once, then the client's later messages (disconnect)."""
    pending = [first_message]

    async def replayed():
        if pending:
            return pending.pop()
        return await receive()

    return replayed
