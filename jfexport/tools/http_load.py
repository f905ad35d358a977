"""`jfexport bench-serve --url`: the bench-serve workload sent to a running server over HTTP.

The same closed-loop clients, request kinds, prompts, questions and seeds as the in-process
run, so the two are comparable; chat requests are streamed to measure time to first token.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from typing import Callable

import httpx

from jfexport.runtime.errors import RuntimeFailure
from jfexport.runtime.serving.images import encoded_base64
from jfexport.tools.bench_serve import Calls, Record, Workload, closed_loop, summarize


def _error(kind: str, start: float, r: httpx.Response) -> Record:
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text[:200]
    return Record(kind, time.perf_counter() - start, error=f"HTTP {r.status_code}: {message}")


def http_calls(client: httpx.Client, model: str, workload: Workload) -> Calls:
    def generate(i: int) -> Record:
        body = {"model": model, "prompt": workload.prompt(i), "n": 1, "steps": workload.steps,
                "cfg_scale": workload.cfg, "seed": i}
        start = time.perf_counter()
        r = client.post("/v1/images/generations", json=body)
        if r.status_code != 200:
            return _error("gen", start, r)
        return Record("gen", time.perf_counter() - start, images=len(r.json()["data"]))

    def chat(i: int) -> Record:
        image, question = workload.question(i)
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + encoded_base64(image)}},
                   {"type": "text", "text": question}]
        body = {"model": model, "messages": [{"role": "user", "content": content}], "seed": i, "stream": True,
                "max_tokens": workload.max_new_tokens, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first, tokens = None, 0
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return _error("chat", start, r)
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Record("chat", time.perf_counter() - start, error=f"stream: {event['error']['message']}")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
        return Record("chat", time.perf_counter() - start, ttft_s=first, tokens=tokens)

    return Calls(generate, chat)


def bench_http(url: str, workload: Workload, api_key: str | None = None,
               progress: Callable[[str], None] = lambda m: None) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=workload.clients + 2, max_keepalive_connections=workload.clients + 2)
    with httpx.Client(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        try:
            models = client.get("/v1/models")
        except httpx.TransportError as e:
            raise RuntimeFailure(f"{url}: no server answers ({e})") from None
        if models.status_code != 200:
            raise RuntimeFailure(f"{url}/v1/models answered {models.status_code}: {models.text[:200]}")
        model = models.json()["data"][0]["id"]
        calls = http_calls(client, model, workload)
        # One warm-up request of each kind (connections, and whatever the server still initialises).
        for warm in (calls.generate(0), calls.chat(0)):
            if warm.error:
                raise RuntimeFailure(f"{url}: the warm-up request failed: {warm.error}")
        progress(f"HTTP run against {url}")
        records, wall = closed_loop(calls, workload)
        replicas = sorted({client.get("/v1/models").headers.get("x-jfexport-replica", "?") for _ in range(8)})
    return {"workload": asdict(workload), "url": url, "model": model, "http": summarize(records, wall),
            "replicas_seen": replicas, "client_machine": {"platform": platform.platform(), "python": platform.python_version()}}
