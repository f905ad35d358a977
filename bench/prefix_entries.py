"""What a chat request pays for the prefix cache as it fills: its lookup and store against the
number of stored conversations, with the block index (`PrefixCache`, what the runtime does) and with
a scan of every entry (the replaced policy, reproduced here as `ScanPrefixCache`), both measured in
this run; then, given a build folder, the runtime's time per chat request as thousands of distinct
conversations fill its cache, with each of the two.

    .venv/bin/python bench/prefix_entries.py engines/default > bench/results/default-prefix-entries-cpu.json
"""

from __future__ import annotations

import json
import random
import sys
import time

import numpy as np
import torch
from jfexport.runtime.batching.prefix_cache import PrefixCache
from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

from jfexport.tools.bench import machine_info

SIZES = (500, 2000, 4000, 8000)
LOOKUPS = 200
# A stored conversation of the default model: the image's tokens and a question, a short answer.
PROMPT_TOKENS, ANSWER_TOKENS = 40, 8
RUNTIME_REQUESTS = 4000
WINDOW = 500


class ScanPrefixCache(PrefixCache):
    """The replaced policy: every entry compared on every lookup and store."""

    def longest(self, image, ids, at_least):
        best, best_len = None, 0
        for (img, key) in self._entries:
            if img != image:
                continue
            n, limit = 0, min(len(key), len(ids) - 1)
            while n < limit and key[n] == ids[n]:
                n += 1
            if n > best_len:
                best, best_len = (img, key), n
        if best is None or best_len < at_least:
            return None
        self._entries.move_to_end(best)
        return self._entries[best], best_len

    def store(self, image, ids, kv):
        key = (image, tuple(ids))
        for other in [k for k in self._entries if k[0] == image and k[1] == key[1][: len(k[1])]]:
            self._remove(other)
        super().store(image, ids, kv)


def _conversation(rng: random.Random, image: int) -> tuple[str, list[int]]:
    return f"{image:064x}", [rng.randrange(1000) for _ in range(PROMPT_TOKENS + ANSWER_TOKENS)]


def structure(kind: type[PrefixCache], size: int) -> float:
    """Milliseconds for one lookup and one store, with `size` distinct conversations stored."""
    rng = random.Random(0)
    kv = [(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))]
    cache = kind(budget_bytes=1 << 40)
    for i in range(size):
        cache.store(*_conversation(rng, i), kv)
    start = time.perf_counter()
    for i in range(LOOKUPS):
        image, ids = _conversation(rng, size + i)
        cache.longest(image, ids, at_least=0)
        cache.store(image, ids, kv)
    return (time.perf_counter() - start) / LOOKUPS * 1e3


def runtime(folder: str, kind: type[PrefixCache]) -> list[dict]:
    """ms per one-question chat request, window by window, each request with an image of its own."""
    rt = JanusFlowRuntime.from_engines(folder)
    chat = rt.scheduler.chat
    chat.prefixes = kind(chat.prefixes.budget_bytes)  # before any request: the worker is idle
    rng = np.random.default_rng(0)
    windows = []
    try:
        start = time.perf_counter()
        for i in range(1, RUNTIME_REQUESTS + 1):
            image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
            rt.submit_chat(image, f"What colour is shape {i}?", max_new_tokens=4).text(timeout=60)
            if i % WINDOW == 0:
                now = time.perf_counter()
                windows.append({"requests": i, "prefix_entries": len(rt.scheduler.chat.prefixes),
                                "ms_per_request": round((now - start) / WINDOW * 1e3, 2)})
                print(windows[-1], file=sys.stderr, flush=True)
                start = now
    finally:
        rt.close()
    return windows


def main() -> None:
    result: dict = {"command": " ".join(["bench/prefix_entries.py", *sys.argv[1:]]), "machine": machine_info(),
                    "structure_ms_per_lookup_and_store": {}}
    for size in SIZES:
        index, scan = structure(PrefixCache, size), structure(ScanPrefixCache, size)
        result["structure_ms_per_lookup_and_store"][size] = {"index": round(index, 4), "scan": round(scan, 4)}
        print(size, result["structure_ms_per_lookup_and_store"][size], file=sys.stderr, flush=True)
    if len(sys.argv) > 1:
        result["runtime"] = {"folder": sys.argv[1], "index": runtime(sys.argv[1], PrefixCache),
                             "scan": runtime(sys.argv[1], ScanPrefixCache)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
