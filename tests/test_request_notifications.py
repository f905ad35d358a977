"""Handles that notify instead of blocking a thread: done callbacks, token listeners, `poll` and
`tokens_since` (what the HTTP server waits with), on the bundled default model's torch engines."""

from __future__ import annotations

import threading
import time

import pytest
from jfexport.reference.bundle import load_bundle
from jfexport.runtime.batching.jobs import CallJob
from jfexport.runtime.errors import RequestCancelled, RequestTimeout, SchedulerStopped
from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

PROMPT = "a red circle at the top left"
IMAGE = Image.new("RGB", (64, 64), (210, 30, 30))  # greedy answers about it run to any token limit
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def runtime():
    rt = JanusFlowRuntime.from_bundle(load_bundle())
    yield rt
    rt.close()


class Calls:
    """Records the threads a notification ran on; `event` is set at the first call."""

    def __init__(self, fn=None):
        self.threads: list[str] = []
        self.event = threading.Event()
        self.fn = fn

    def __call__(self) -> None:
        self.threads.append(threading.current_thread().name)
        if self.fn is not None:
            self.fn()
        self.event.set()

    def wait(self, timeout: float = 30) -> None:
        assert self.event.wait(timeout), "the notification never came"


def _error(handle) -> BaseException | None:
    return handle._job.error


def _stall_worker(runtime, seconds: float) -> CallJob:
    """Keep the scheduler's worker busy in one call, as in a long engine call."""
    job = CallJob(runtime.scheduler.alive)
    runtime.scheduler.call(lambda: time.sleep(seconds), job)
    return job


def test_done_callback_runs_once_on_the_worker_and_at_once_when_done(runtime):
    handle = runtime.submit_generate(PROMPT, steps=3, seed=2)
    done = Calls()
    handle.add_done_callback(done)
    done.wait()
    time.sleep(0.05)
    assert done.threads == ["jfexport-scheduler"] and handle.done()
    assert len(handle.result(timeout=0)) == 1  # ready: no wait
    late = Calls()
    handle.add_done_callback(late)
    assert late.threads == [threading.current_thread().name]  # already done: at once, here


def test_a_listener_sees_every_token_without_waiting(runtime):
    expected = list(runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=20))
    handle = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=20)
    news = threading.Event()
    remove = handle.add_listener(news.set)
    tokens, over = [], False
    deadline = time.monotonic() + 30
    while not over:
        assert time.monotonic() < deadline
        news.wait(1)
        news.clear()
        more, over = handle.tokens_since(len(tokens))
        tokens += more
    remove()
    assert tokens == expected and len(expected) == 20 and handle.finish_reason == "length"
    assert handle.tokens_since(0) == (expected, True)


@pytest.mark.parametrize("how", ["cancel", "timeout", "queued timeout"])
def test_done_callback_on_cancellation_and_timeout(runtime, how):
    if how == "queued timeout":  # never admitted: the worker is busy; poll() enforces the deadline
        stall = _stall_worker(runtime, 1.0)
        handle = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=50, timeout=0.2)
    else:
        handle = runtime.submit_generate(PROMPT, n=2, steps=1000, timeout=0.3 if how == "timeout" else None)
    done = Calls()
    handle.add_done_callback(done)
    if how == "cancel":
        handle.cancel()
    if how == "queued timeout":
        time.sleep(0.3)
        assert not done.event.is_set()  # the worker is still in its call
        assert handle.poll()  # what a waiting caller would have noticed
        assert done.threads == [threading.current_thread().name]
        with pytest.raises(RequestTimeout):
            handle.tokens_since(0)
        stall.result()
    done.wait()
    assert isinstance(_error(handle), RequestCancelled if how == "cancel" else RequestTimeout)
    time.sleep(0.1)
    assert len(done.threads) == 1
    deadline = time.monotonic() + 5
    while runtime.stats()["active_generation_rows"] or runtime.stats()["active_chat_rows"]:
        assert time.monotonic() < deadline, "rows not freed"
        time.sleep(0.01)


def test_a_failing_callback_neither_stops_the_worker_nor_the_others(runtime, caplog):
    handle = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=4)
    after = Calls()
    handle.add_listener(lambda: 1 / 0)
    handle.add_done_callback(lambda: [][1])
    handle.add_done_callback(after)
    after.wait()
    assert len(handle.tokens_since(0)[0]) == 4
    assert runtime.chat([IMAGE], [QUESTION], max_new_tokens=3)  # the worker goes on
    assert "ZeroDivisionError" in caplog.text and "IndexError" in caplog.text


def test_a_callback_may_call_the_runtime(runtime):
    inner = []
    blocking_error = []

    def submit_more() -> None:  # on the worker: submitting and reading never wait
        runtime.stats()
        inner.append(runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=5))
        try:
            runtime.chat([IMAGE], [QUESTION], max_new_tokens=2)  # would wait for the thread it runs on
        except RuntimeError as e:
            blocking_error.append(e)

    handle = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=3)
    done = Calls(submit_more)
    handle.add_done_callback(done)
    done.wait()
    assert len(inner) == 1 and len(list(inner[0])) == 5  # the request made in the callback is served
    assert blocking_error and "notification" in str(blocking_error[0])
    assert runtime.chat([IMAGE], [QUESTION], max_new_tokens=2)


def test_iterating_and_text_keep_their_behaviour(runtime):
    handle = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=12)
    ids = list(handle)
    assert len(ids) == 12 and handle.text() == runtime.tokenizer.decode(ids)
    cancelled = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=500)
    next(iter(cancelled))
    cancelled.cancel()
    with pytest.raises(RequestCancelled):
        list(cancelled)


def test_a_stopped_scheduler_notifies_every_waiting_request():
    rt = JanusFlowRuntime.from_bundle(load_bundle())
    stall = _stall_worker(rt, 0.5)
    handles = [rt.submit_chat(IMAGE, QUESTION, max_new_tokens=50), rt.submit_generate(PROMPT, steps=50)]
    calls = [Calls() for _ in handles]
    for handle, call in zip(handles, calls):
        handle.add_done_callback(call)
    rt.close()
    for handle, call in zip(handles, calls):
        call.wait(10)
        assert isinstance(_error(handle), SchedulerStopped)
    assert stall.finished
