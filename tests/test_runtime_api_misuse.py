"""The runtime's Python API as an embedding service misuses it: every refusal a named JanusFlowError
(never a bare TypeError, IndexError or a dead worker), and the values it accepts used as checked."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from jfexport.runtime.batching.chat_batch import ChatSlots
from jfexport.runtime.batching.generation_batch import GenerationRows
from jfexport.runtime.batching.jobs import CallJob
from jfexport.runtime.batching.scheduler import Observers, Scheduler
from jfexport.runtime.errors import SchedulerStopped, WaitTimeout
from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

from jfexport.core.errors import InputError, JanusFlowError, RuntimeFailure
from jfexport.core.manifest import EnginesError

IMAGE = Image.new("RGB", (64, 64), (200, 30, 30))
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def runtime(tiny_build):
    rt = JanusFlowRuntime.from_engines(tiny_build)
    yield rt
    rt.close()


@pytest.mark.parametrize("seed", [np.int64(7), np.uint64(7), np.int32(7), np.uint8(7)], ids=lambda s: type(s).__name__)
def test_a_numpy_integer_seed_is_the_seed_it_holds(runtime, seed):
    """The seed check accepted numpy integers, but the code after it used the value as given, which
    torch's generator refused with a bare TypeError."""
    images = runtime.submit_generate("a red circle", steps=2, seed=seed).result()
    assert [im.tobytes() for im in images] == [im.tobytes() for im in runtime.generate(["a red circle"], steps=2, seed=7)]
    answer = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=4, temperature=1.0, seed=seed)
    assert answer.token_ids == runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=4, temperature=1.0, seed=7).token_ids


@pytest.mark.parametrize("timeout", [math.nan, "5", -1, 0, math.inf, True])
def test_a_request_timeout_that_is_not_a_positive_number_is_named(runtime, timeout):
    for submit in (lambda: runtime.submit_generate("a red circle", steps=2, timeout=timeout),
                   lambda: runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=2, timeout=timeout)):
        with pytest.raises(InputError, match="^timeout: "):
            submit()


def test_a_wait_that_ends_first_is_a_named_timeout_and_the_request_goes_on(runtime):
    handle = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=200)
    with pytest.raises(WaitTimeout) as caught:
        handle.text(timeout=0.001)
    # Caught as the runtime's errors are, and as concurrent.futures' waits are.
    assert isinstance(caught.value, RuntimeFailure) and isinstance(caught.value, TimeoutError)
    assert "goes on" in str(caught.value)
    assert len(handle.text(timeout=60)) > 0 and handle.finish_reason is not None
    for timeout in (math.nan, -0.5, "1"):
        with pytest.raises(InputError, match="^timeout: "):
            handle.text(timeout=timeout)


@pytest.mark.parametrize("prompt", [None, 42, b"a red circle"])
def test_a_prompt_that_is_not_text_is_named(runtime, prompt):
    with pytest.raises(InputError, match="^prompt: "):
        runtime.submit_generate(prompt, steps=2)


def test_answer_and_token_indices_out_of_range_are_named(runtime):
    handle = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=3, n=2, top_logprobs=2)
    handle.text(timeout=60)
    handle.choice(1).text(timeout=60)
    for i in (2, -1, True, 1.0):
        with pytest.raises(InputError, match="^choice: "):
            handle.choice(i)
    assert handle.choice(np.int64(1)).finish_reason is not None
    read = len(handle.choice(0).token_ids) + (handle.choice(0).finish_reason == "stop")
    assert handle.logprobs(read - 1).logprob <= 0
    with pytest.raises(InputError, match="^logprobs: "):
        handle.logprobs(read)
    plain = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=2)
    with pytest.raises(InputError, match="^logprobs: .*without top_logprobs"):
        plain.logprobs(0)


def test_a_question_asked_for_no_token_ends_at_its_limit(runtime):
    handle = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=0, n=2)
    assert [handle.choice(i).text(timeout=60) for i in range(2)] == ["", ""]
    assert [handle.choice(i).finish_reason for i in range(2)] == ["length", "length"]


@pytest.mark.parametrize("options,name", [
    ({"tasks": "chat"}, "tasks"),
    ({"tasks": ("generation",)}, "tasks"),
    ({"tasks": ()}, "tasks"),
    ({"device": "tpu"}, "device"),
    ({"device": 0}, "device"),
    ({"torch_threads": 0}, "torch_threads"),
    ({"torch_threads": -2}, "torch_threads"),
    ({"engine_threads": 0}, "engine_threads"),
    ({"max_queue": 0}, "max_queue"),
    ({"prefix_cache_bytes": -1}, "prefix_cache_bytes"),
    ({"kv_budget_bytes": 1.5}, "kv_budget_bytes"),
])
def test_bad_runtime_options_are_named_before_anything_starts(tiny_build, options, name):
    before = threading.active_count()
    with pytest.raises(InputError, match=f"^{name}: "):
        JanusFlowRuntime.from_engines(tiny_build, **options)
    assert threading.active_count() == before  # no worker was started


def test_a_precision_no_build_option_makes_is_not_sent_to_a_missing_flag(tiny_build):
    with pytest.raises(EnginesError) as caught:
        JanusFlowRuntime.from_engines(tiny_build, precision="bf16")
    assert "--bf16" not in str(caught.value) and "not bf16" in str(caught.value)


def test_a_worker_that_cannot_start_says_why_to_every_request():
    """A failure before the worker's loop (its torch thread count) stopped it with a traceback on stderr
    only; requests then got a SchedulerStopped that did not say why."""
    observers = Observers()
    scheduler = Scheduler(GenerationRows(None, {}, 0, 0, observers),  # type: ignore[arg-type]
                          ChatSlots({}, None, 2, 64, 1 << 20, observers), observers, torch_threads=0)
    try:
        scheduler._thread.join(10)  # type: ignore[union-attr]
        job: CallJob[int] = CallJob(scheduler.alive)
        with pytest.raises(SchedulerStopped, match="set_num_threads"):
            scheduler.call(lambda: 1, job)
    finally:
        scheduler.close()


def test_a_closed_runtime_counts_no_rows_in_flight(tiny_build):
    rt = JanusFlowRuntime.from_engines(tiny_build)
    handles = [rt.submit_generate("a red circle", n=4, steps=400), rt.submit_chat(IMAGE, QUESTION, max_new_tokens=500)]
    for _ in range(3000):  # 30 s at most
        if rt.stats()["active_generation_rows"] and rt.stats()["active_chat_rows"]:
            break
        threading.Event().wait(0.01)
    assert rt.stats()["active_generation_rows"] and rt.stats()["active_chat_rows"]
    rt.close()
    assert rt.stats()["active_generation_rows"] == 0 and rt.stats()["active_chat_rows"] == 0
    for handle in handles:
        with pytest.raises(JanusFlowError):
            handle.result(timeout=10) if hasattr(handle, "result") else handle.text(timeout=10)
