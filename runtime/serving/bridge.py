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
from typing import Callable


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


class Feed:
    """What a handle publishes, on the event loop: woken by the handle's listener, read without
    blocking by `read() -> (items not read before, whether no more will come)`."""

    def __init__(self, handle, read: Callable[[], tuple[list, bool]]):
        self._read_new = read
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._posted = False  # a wake-up is on its way to the loop: later news rides along with it
        self._pending: collections.deque = collections.deque()
        self._over = False
        self._remove = handle.add_listener(self._from_worker)

    def _from_worker(self) -> None:  # on the scheduler's thread: one post per batch of news at most
        if not self._posted:
            self._posted = True
            _post(self._loop, self._wake)

    def _wake(self) -> None:
        self._posted = False
        self._event.set()

    async def next(self, timeout: float):
        """The next item, None at the end; raises the request's error, or TimeoutError after
        `timeout` s without news (the caller's cue to check its client and call again)."""
        # One deadline for the call: a wake-up that brings nothing (an Euler step, no preview) does not
        # restart the wait, or a request whose steps are quick would never give its caller the cue.
        deadline = self._loop.time() + timeout
        while not self._pending:
            if self._over:
                return None
            self._event.clear()  # before reading: news after the read sets it again
            items, self._over = self._read_new()
            self._pending.extend(items)
            if not items and not self._over:
                await asyncio.wait_for(self._event.wait(), max(0.0, deadline - self._loop.time()))
        return self._pending.popleft()

    def close(self) -> None:
        self._remove()


def unread(read_since: Callable[[int], tuple[list, bool]]) -> Callable[[], tuple[list, bool]]:
    """`read_since(start) -> (items from index start on, over)` as a reader of what is new at each call."""
    done = 0

    def read() -> tuple[list, bool]:
        nonlocal done
        items, over = read_since(done)
        done += len(items)
        return items, over

    return read


class TokenFeed(Feed):
    """The token ids of a chat request's answers (`ChatHandle.tokens_since` of each answer's handle) as
    (answer, token id), then (answer, None) once that answer is over; the handles share one job, so
    one listener hears every row."""

    def __init__(self, handles: list):
        readers = [unread(h.tokens_since) for h in handles]
        over = [False] * len(handles)

        def read() -> tuple[list, bool]:
            items: list[tuple[int, int | None]] = []
            for i, reader in enumerate(readers):
                if over[i]:
                    continue
                tokens, over[i] = reader()
                items.extend((i, t) for t in tokens)
                if over[i]:
                    items.append((i, None))
            return items, all(over)

        super().__init__(handles[0], read)
