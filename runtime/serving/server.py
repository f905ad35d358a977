"""`jfexport serve`: uvicorn over the app, engines loaded in the background, SIGTERM drains.

SIGTERM (or Ctrl-C, or SIGHUP: a closed terminal): new requests get 503 and /ready turns 503 while
the listener stays open, in-flight requests get up to the grace period to finish; those still
running then get a 503 (OpenAI's error JSON) and the server exits 0 within about a second. A
second Ctrl-C ends the grace at once: the same 503s, and exit 130.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from jfexport import defaults
from jfexport.core.errors import BUG, INTERRUPTED, exit_code

from .app import build_app
from .connections import guarded_protocol
from .loading import load_runtime
from .service import Service
from .settings import ServeSettings

log = logging.getLogger("jfexport.serve")

# After the grace: how long aborted requests get to send their 503, and uvicorn its last writes.
ABORT_S = 0.5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.grace = service.settings.grace
        self.drain_deadline: float | None = None
        self.aborted_at: float | None = None
        self.failed = 0  # the exit code of a failed load
        self.interrupted = False  # a second Ctrl-C cut the grace short

    def handle_exit(self, sig: int, frame) -> None:
        # Not uvicorn's handler: it would close the listener at once (connection refused, not 503)
        # and re-raise the signal after shutdown, which exits non-zero.
        if self.drain_deadline is None:
            log.info("%s: draining (%d in flight, grace %.0f s)", signal.Signals(sig).name, self.service.in_flight,
                     self.grace)
            self.service.draining = True
            self.drain_deadline = time.monotonic() + self.grace
        elif sig == signal.SIGINT and not self.interrupted:
            # Not uvicorn's force_exit: it cancels the requests in flight, which answer a plain-text 500.
            log.warning("second Ctrl-C: the grace ends now (%d in flight)", self.service.in_flight)
            self.interrupted = True
            self.drain_deadline = time.monotonic()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            now = time.monotonic()
            if self.service.in_flight and now >= self.drain_deadline and self.aborted_at is None:
                # Each gets its 503 from its own coroutine: uvicorn's shutdown would cancel them
                # instead, and a cancelled request answers a plain-text 500.
                log.warning("grace period over: %d request(s) still in flight get a 503", self.service.in_flight)
                self.service.abort()
                self.aborted_at = now
            if self.service.in_flight == 0 or (self.aborted_at is not None and now >= self.aborted_at + ABORT_S):
                self.should_exit = True
        return await super().on_tick(counter)

    def load_in_background(self, engines: Path) -> None:
        def load() -> None:
            try:
                runtime = load_runtime(engines, self.service.settings)
            except Exception as e:
                self.failed = exit_code(e)
                # A bug shows its traceback; a build or backend at fault is named in one line.
                log.error("could not load %s: %s", engines, e, exc_info=self.failed == BUG)
                self.should_exit = True
                return
            self.service.attach(runtime)
            log.info("ready: %s (%s)", engines, runtime.backend)

        threading.Thread(target=load, daemon=True, name="jfexport-load").start()


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads: a port in use is reported at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(engines: Path, host: str = defaults.HOST, port: int = defaults.PORT,
          settings: ServeSettings = ServeSettings()) -> int:
    """Serve until a signal; the exit code (0 after a drain, 130 after one a second Ctrl-C cut short; when
    the engines failed to load, the CLI's code for the error: 2 a user error such as a bad build, 3 a
    runtime failure, 1 a bug).

    Raises OSError before loading anything when host:port cannot be listened on.
    """
    sock = listen(host, port)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("jfexport.access", "jfexport.serve"):  # the access log is INFO whatever the CLI's -v
        logging.getLogger(name).setLevel(logging.INFO)
    app = build_app(None, settings)
    service: Service = app.state.service
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                            http=guarded_protocol(settings, service.count_refusal),
                            h11_max_incomplete_event_size=settings.max_header_bytes, timeout_graceful_shutdown=1,
                            timeout_keep_alive=5)
    server = DrainingServer(config, service)
    # uvicorn handles SIGINT and SIGTERM; a closed terminal's SIGHUP drains too, rather than killing
    # the requests in flight.
    signal.signal(signal.SIGHUP, server.handle_exit)
    server.load_in_background(engines)
    log.info("listening on http://%s:%d (model %r from %s)", host, port, settings.model_id, engines)
    server.run(sockets=[sock])
    if service.runtime is not None:
        service.runtime.close()
    loading = any(t.name == "jfexport-load" for t in threading.enumerate())
    if service.busy_threads or loading:
        log.warning("stopping with %d request thread(s) still busy%s: the process should exit without waiting for "
                    "them (exit_now)", service.busy_threads, " and the engines still loading" if loading else "")
    return server.failed or (INTERRUPTED if server.interrupted else 0)


def exit_now(code: int) -> None:
    """End the serving process with `code` once `serve` returned, without the interpreter's teardown.

    That teardown would wait for threads in the middle of a request's preparation or of loading
    (they cannot be stopped; a loader in native code can even abort the process), and frees the
    engines one object at a time: seconds, after a drain that promised to end within its grace.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
