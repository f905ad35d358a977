"""Blocking runtime calls on threads of their own, awaited from the event loop.

A thread per request rather than a pool: a pool's size would cap how many requests can wait on
the scheduler at once, below the queue the scheduler itself admits.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
_END = object()


def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed (server shut down) while the thread ran
        pass


def in_thread(fn: Callable[[], T]) -> asyncio.Future:
    """Run `fn` on a daemon thread; the future gets its result or exception."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            _post(loop, settle, True, fn())
        except BaseException as e:  # handed to the awaiting coroutine, not lost in the thread
            _post(loop, settle, False, e)

    threading.Thread(target=run, daemon=True, name="jfexport-call").start()
    return future


class TokenPump:
    """Iterates a token iterator (a ChatHandle) on a thread and queues its items for the event loop."""

    def __init__(self, tokens: Iterable[int]):
        self._queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                for token in tokens:
                    _post(loop, self._queue.put_nowait, token)
                _post(loop, self._queue.put_nowait, _END)
            except BaseException as e:
                _post(loop, self._queue.put_nowait, e)

        threading.Thread(target=run, daemon=True, name="jfexport-chat").start()

    async def next(self, timeout: float) -> int | None:
        """The next token id, None at the end; raises the iterator's error, or TimeoutError after `timeout` s."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item
