"""`jfexport serve`: uvicorn over the app, engines loaded in the background, SIGTERM drains.

SIGTERM (or Ctrl-C): new requests get 503 and /ready turns 503 while the listener stays open,
in-flight requests get up to the grace period to finish, then the server exits 0. A second
Ctrl-C exits at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import uvicorn

from .app import build_app
from .loading import load_runtime
from .service import Limits, Service

log = logging.getLogger("jfexport.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, grace: float):
        super().__init__(config)
        self.service = service
        self.grace = grace
        self.drain_deadline: float | None = None
        self.failed = False

    def handle_exit(self, sig: int, frame) -> None:
        # Not uvicorn's handler: it would close the listener at once (connection refused, not 503)
        # and re-raise the signal after shutdown, which exits non-zero.
        if self.drain_deadline is None:
            log.info("signal %d: draining (%d in flight, grace %.0f s)", sig, self.service.in_flight, self.grace)
            self.service.draining = True
            self.drain_deadline = time.monotonic() + self.grace
        elif sig == signal.SIGINT:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.service.in_flight == 0 or time.monotonic() >= self.drain_deadline:
                if self.service.in_flight:
                    log.warning("grace period over: %d request(s) still in flight", self.service.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)

    def load_in_background(self, engines: Path, backend: str, precision: str | None, max_queue: int) -> None:
        def load() -> None:
            try:
                runtime = load_runtime(engines, backend, precision, max_queue)
            except Exception as e:
                log.error("could not load %s: %s", engines, e)
                self.failed = self.should_exit = True
                return
            self.service.attach(runtime)
            log.info("ready: %s (%s)", engines, runtime.backend)

        threading.Thread(target=load, daemon=True, name="jfexport-load").start()


def serve(engines: Path, host: str = "127.0.0.1", port: int = 8000, *, backend: str = "auto",
          precision: str | None = None, api_key: str | None = None, model_id: str = "janusflow",
          limits: Limits = Limits(), max_queue: int = 64, grace: float = 30.0) -> int:
    """Serve until a signal; the exit code (0 after a drain, 1 when the engines failed to load)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("jfexport.access", "jfexport.serve"):  # the access log is INFO whatever the CLI's -v
        logging.getLogger(name).setLevel(logging.INFO)
    app = build_app(None, api_key=api_key, model_id=model_id, limits=limits)
    service: Service = app.state.service
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5, timeout_keep_alive=5)
    server = DrainingServer(config, service, grace)
    server.load_in_background(engines, backend, precision, max_queue)
    log.info("listening on http://%s:%d (model %r from %s)", host, port, model_id, engines)
    server.run()
    if service.runtime is not None:
        service.runtime.close()
    return 1 if server.failed else 0
