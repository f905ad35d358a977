"""What the routes share: the runtime (once loaded and verified), limits, drain state, metrics."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

from .errors import APIError
from .metrics import ServingMetrics

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 << 20
    max_image_bytes: int = 4 << 20  # of the encoded image in a data: URL
    max_image_pixels: int = 4096 * 4096
    request_timeout: float | None = 120.0  # seconds a request may take, queueing included
    default_max_tokens: int = 256
    # Threads for short blocking work off the event loop (image decoding, submitting, PNG
    # encoding); waiting for results and tokens holds none.
    blocking_threads: int = 8


class Service:
    def __init__(self, model_id: str, limits: Limits, replica_id: str | None = None):
        self.model_id = model_id
        self.limits = limits
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}"
        self.created = int(time.time())
        self.runtime = None
        self.draining = False
        self.in_flight = 0  # touched on the event loop only
        self.metrics = ServingMetrics(lambda: self.runtime.stats() if self.runtime is not None else None)
        self._pool: ThreadPoolExecutor | None = None  # started on first use, in the serving process

    def blocking(self, fn: Callable[[], T]) -> "asyncio.Future[T]":
        """Run short blocking work `fn` on the bounded pool; await the result."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.limits.blocking_threads, thread_name_prefix="jfexport-serve")
        return asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def attach(self, runtime) -> None:
        """Serve `runtime` from now on; call once its engines are loaded and verified."""
        runtime.add_batch_observer(self.metrics.observe_batch)
        self.runtime = runtime

    @property
    def ready(self) -> bool:
        return self.runtime is not None and not self.draining

    def draining_error(self) -> APIError:
        return APIError(503, "the server is shutting down and admits no new requests", "server_error",
                        code="draining", retry_after=1)

    def admit(self):
        """The runtime for a new request, or 503 while loading (draining is refused on arrival, by the middleware)."""
        if self.runtime is None:
            raise APIError(503, "the engines are still loading", "server_error", code="loading", retry_after=2)
        return self.runtime

    def check_model(self, model: str | None) -> None:
        if model not in (None, "", self.model_id):
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    def count_error(self, error: APIError) -> None:
        self.metrics.errors.labels(error.code or error.type).inc()

    def request_started(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def request_finished(self, kind: str, status: int, seconds: float) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(kind, str(status)).inc()
        if status == 200:
            self.metrics.latency.labels(kind).observe(seconds)
