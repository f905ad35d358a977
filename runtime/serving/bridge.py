"""From the scheduler's handles to the event loop, with no thread per waiting request.

A handle's done callback or token listener runs on the scheduler's worker and only posts to the
loop (`call_soon_threadsafe`); the request's coroutine awaits a future or an event. Thousands of
requests can wait on the scheduler at once while the server holds a fixed number of threads.
Short blocking work (decoding an uploaded image, tokenising and submitting, encoding PNGs) runs
on the service's bounded pool (`Service.blocking`), never the wait itself.
"""

from __future__ import annotations

import asyncio
import collections


def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed (server shut down) before the request ended
        pass


def when_done(handle) -> asyncio.Future:
    """A future that resolves (to None) once the handle's request has ended, however it ended."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle() -> None:
        if not future.done():
            future.set_result(None)

    handle.add_done_callback(lambda: _post(loop, settle))
    return future


class TokenFeed:
    """The token ids of a chat request's answers (handles of one request's rows) on the event loop:
    woken by one listener, read without blocking."""

    def __init__(self, handles: list):
        self._handles = handles
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._posted = False  # a wake-up is on its way to the loop: later tokens ride along with it
        self._read = [0] * len(handles)
        self._over = [False] * len(handles)
        self._pending: collections.deque[tuple[int, int | None]] = collections.deque()
        # The handles share one job: one listener hears every row.
        self._remove = handles[0].add_listener(self._from_worker)

    def _from_worker(self) -> None:  # on the scheduler's thread: one post per batch of news at most
        if not self._posted:
            self._posted = True
            _post(self._loop, self._wake)

    def _wake(self) -> None:
        self._posted = False
        self._event.set()

    async def next(self, timeout: float) -> tuple[int, int | None] | None:
        """(answer, its next token id), (answer, None) once that answer is over, None once all are;
        raises the request's error, or TimeoutError after `timeout` s without news (the caller's cue
        to check its client and call again)."""
        while not self._pending:
            if all(self._over):
                return None
            self._event.clear()  # before reading: news after the read sets it again
            for i, handle in enumerate(self._handles):
                if self._over[i]:
                    continue
                tokens, self._over[i] = handle.tokens_since(self._read[i])
                self._read[i] += len(tokens)
                self._pending.extend((i, t) for t in tokens)
                if self._over[i]:
                    self._pending.append((i, None))
            if not self._pending:
                await asyncio.wait_for(self._event.wait(), timeout)
        return self._pending.popleft()

    def close(self) -> None:
        self._remove()
