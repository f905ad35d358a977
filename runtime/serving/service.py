"""What the routes share: the runtime (once loaded and verified), settings, drain state, metrics."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from jfexport.runtime.errors import RequestCancelled

from .errors import APIError, shown
from .metrics import ServingMetrics
from .settings import ServeSettings

T = TypeVar("T")


def left(deadline: float | None) -> float | None:
    """Seconds from now to `deadline` (a `Service.deadline()`), at least a millisecond; None for none."""
    return None if deadline is None else max(1e-3, deadline - time.monotonic())


class Service:
    def __init__(self, settings: ServeSettings, replica_id: str | None = None):
        self.model_id = settings.model_id
        self.settings = settings
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}"
        self.created = int(time.time())
        self.runtime = None
        self.draining = False
        self.in_flight = 0  # touched on the event loop only
        self.metrics = ServingMetrics(lambda: self.runtime.stats() if self.runtime is not None else None)
        self._pool: ThreadPoolExecutor | None = None  # started on first use, in the serving process
        self._busy = 0  # pool threads running a request's work (any thread)
        self._busy_lock = threading.Lock()
        self._handles: weakref.WeakSet = weakref.WeakSet()  # the runtime handles of requests in flight
        self._aborted: asyncio.Future | None = None  # resolved once in-flight requests are given up

    def deadline(self) -> float | None:
        """When a request arriving now times out (time.monotonic()), None without a request timeout."""
        timeout = self.settings.request_timeout
        return None if timeout is None else time.monotonic() + timeout

    async def blocking(self, fn: Callable[[], T], deadline: float | None = None) -> T:
        """Run short blocking work `fn` on the bounded pool and await its result.

        The wait ends early with the request's 504 at `deadline` (from `deadline()`), and with a 503
        once `abort()` gives up on in-flight requests; the thread still finishes `fn` (a thread
        cannot be stopped) and its result is dropped.
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.settings.blocking_threads, thread_name_prefix="jfexport-serve")
        aborted = self.until_aborted()
        if aborted.done():
            raise self.aborted_error()

        def counted() -> T:
            with self._busy_lock:
                self._busy += 1
            try:
                return fn()
            finally:
                with self._busy_lock:
                    self._busy -= 1

        work = asyncio.get_running_loop().run_in_executor(self._pool, counted)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = await asyncio.wait({work, aborted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it any more
        if aborted in done:
            raise self.aborted_error()
        raise APIError(504, f"the request timed out (preparing it took over {self.settings.request_timeout:g} s)",
                       "timeout_error", code="timeout")

    @property
    def busy_threads(self) -> int:
        """Pool threads still running a request's work (a process exiting now would wait for them)."""
        return self._busy

    def track(self, handle) -> None:
        """Count `handle` (a runtime request) among those `abort()` cancels."""
        self._handles.add(handle)

    def until_aborted(self) -> asyncio.Future:
        """A future resolved once `abort()` gives up on the requests in flight. On the loop."""
        if self._aborted is None:
            self._aborted = asyncio.get_running_loop().create_future()
        return self._aborted

    def abort(self) -> None:
        """Give up on every request in flight (the drain's grace is over): each answers a 503. On the loop."""
        if not self.until_aborted().done():
            self.until_aborted().set_result(None)
        for handle in list(self._handles):
            handle.cancel()

    @property
    def aborting(self) -> bool:
        """Whether `abort()` gave up on the requests in flight."""
        return self._aborted is not None and self._aborted.done()

    def answer_for(self, error: BaseException) -> BaseException:
        """What to answer for a request's runtime `error`: the drain's 503 where `abort()` cancelled it."""
        return self.aborted_error() if self.aborting and isinstance(error, RequestCancelled) else error

    def aborted_error(self) -> APIError:
        return APIError(503, "the server is shutting down and gave up on this request; retry on another replica",
                        "server_error", code="shutting_down", retry_after=1)

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
            raise APIError(404, f"The model {shown(model)} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    def count_error(self, error: APIError) -> None:
        self.count_refusal(error.code or error.type)

    def count_refusal(self, code: str) -> None:
        """An error answer, by its code (the connection guard's answers have nothing else)."""
        self.metrics.errors.labels(code).inc()

    def request_refused(self, kind: str, status: int) -> None:
        """A model-route request answered on arrival, never in flight (the drain's 503)."""
        self.metrics.requests.labels(kind, str(status)).inc()

    def request_started(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def request_finished(self, kind: str, status: int, seconds: float) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(kind, str(status)).inc()
        if status == 200:
            self.metrics.latency.labels(kind).observe(seconds)
