"""Many clients at once on the real server: no thread is held per waiting request.

A server of its own (a queue long enough for every request here), talked to over real sockets
on 127.0.0.1 by one asyncio httpx client; the server's thread count is read from
/proc/<pid>/status while the requests are in flight.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .serve_helpers import chat_messages, data_url, metric, running_server, shape_image
from .test_server import BABBLE_IMAGE

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")]

STREAMS = 120  # concurrent streamed answers
WHOLE = 24  # concurrent whole (non-streamed) answers
IMAGES = 8  # concurrent image generations
# Threads the server may add under load: its bounded pool for short blocking work (image
# decoding, submitting; 8 threads) and a few more, never one per request.
SPARE_THREADS = 16


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory, default_build):
    with running_server(["--engines", str(default_build), "--max-queue", "512", "--request-timeout", "300"],
                        tmp_path_factory.mktemp("busy") / "server.log") as running:
        yield running


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for pid {pid}")


class ThreadSampler:
    """The most threads the server had, sampled every few milliseconds in the background, and the
    most requests it had in flight (its /metrics, every 50 ms)."""

    def __init__(self, pid: int, url: str):
        self.pid, self.url, self.peak, self.in_flight, self._stop = pid, url, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            last = 0.0
            while not self._stop.is_set():
                self.peak = max(self.peak, threads_of(self.pid))
                if time.monotonic() - last > 0.05:
                    last = time.monotonic()
                    in_flight = metric(http.get("/metrics").text, "jfexport_requests_in_flight")
                    self.in_flight = max(self.in_flight, int(in_flight))
                time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


async def _streamed(client: httpx.AsyncClient, messages, max_tokens: int) -> str:
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True}
    text = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text.append(event["choices"][0]["delta"].get("content") or "")
    return "".join(text)


async def _whole(client: httpx.AsyncClient, messages, max_tokens: int) -> str:
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


async def _image(client: httpx.AsyncClient) -> list[str]:
    r = await client.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 6, "seed": 5})
    assert r.status_code == 200, r.text
    return [d["b64_json"] for d in r.json()["data"]]


def test_hundreds_of_waiting_requests_hold_no_thread_each(busy_server):
    url, proc = busy_server
    # Two questions whose greedy answers differ (one babbles to the limit): each answer must be
    # the one it has alone, whatever ran beside it.
    questions = [(chat_messages(data_url(shape_image())), 16), (chat_messages(data_url(BABBLE_IMAGE)), 160)]

    async def run():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            alone = [await _whole(client, m, n) for m, n in questions]
            image_alone = await _image(client)
            idle = threads_of(proc.proc.pid)
            with ThreadSampler(proc.proc.pid, url) as sampler:
                jobs = [_streamed(client, *questions[i % 2]) for i in range(STREAMS)]
                jobs += [_whole(client, *questions[i % 2]) for i in range(WHOLE)]
                jobs += [_image(client) for _ in range(IMAGES)]
                results = await asyncio.gather(*jobs)
            return alone, image_alone, idle, sampler, results

    alone, image_alone, idle, sampler, results = asyncio.run(run())
    peak, total = sampler.peak, STREAMS + WHOLE + IMAGES
    texts, images = results[:STREAMS + WHOLE], results[STREAMS + WHOLE:]
    assert alone[0] != alone[1] and all(alone)
    assert texts == [alone[i % 2] for i in range(STREAMS)] + [alone[i % 2] for i in range(WHOLE)]
    assert images == [image_alone] * IMAGES
    print(f"server threads: {idle} idle, {peak} at most; {sampler.in_flight} of {total} requests in flight at once")
    assert sampler.in_flight >= 3 * SPARE_THREADS  # they did wait together: the bound below means something
    assert peak - idle <= SPARE_THREADS, f"{peak} threads under {total} concurrent requests, {idle} idle: a thread per request"
