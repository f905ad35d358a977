"""`jfexport bench-serve --decode`: decoding through the public API, against the K/V cache's floor.

Reports, for a build served in process:
- decode tokens/s at 1, 4 and 8 rows, at short context (one image + question) and long context
  (the same question after a long conversation history): the median time between two
  consecutive batched decode steps of that many rows (a batch observer timestamps each step), so
  rows that end early never dilute the figure;
- time to first token of each turn of a 3-turn conversation, with and without prefix reuse;
- one bare `llm_decode` call at 1 row over 16 and 2,000 past tokens, and at 8 rows over 2,000;
- bytes per decode step as fed (weights once, the past as the cache feeds it: every row `width`
  columns, the new K/V written out and into the cache) against the floor (weights once + each
  row's live K/V once). These are computed from the shapes fed, not read from hardware counters.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch
from PIL import Image

from .bench import machine_info, peak_rss_mib

QUESTION = "Describe the picture in detail, please."
COLOURS = ((220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 210, 30), (20, 20, 20), (240, 240, 240),
           (120, 40, 160), (30, 160, 160))
TURNS = ("What colour is the shape?", "And where is it in the picture?", "Describe it once more, please.")


def _history(runtime, tokens: int) -> list[tuple[str, str]]:
    """A conversation history that brings the question's prompt to about `tokens` tokens."""
    sentence = "the red shape sits at the top left of a plain picture"

    def turns(reps: int) -> list[tuple[str, str]]:
        return [("user", "Look at this picture."), ("assistant", " ".join([sentence] * reps))]

    def length(reps: int) -> int:
        return len(runtime.processor.conversation_ids([*turns(reps), ("user", QUESTION)]))

    base, per = length(1), length(2) - length(1)
    return turns(max(1, 1 + (tokens - base) // per))


class _StepClock:
    """Timestamps of batched decode steps, by rows."""

    def __init__(self, runtime):
        self.times: list[tuple[float, str, int]] = []
        runtime.add_batch_observer(lambda kind, rows: self.times.append((time.perf_counter(), kind, rows)))

    def step_ms(self, rows: int) -> float | None:
        gaps = [(b[0] - a[0]) * 1e3 for a, b in zip(self.times, self.times[1:])
                if a[1] == b[1] == "chat" and a[2] == b[2] == rows]
        return statistics.median(gaps) if gaps else None


def _decode_rate(runtime, rows: int, history, tokens: int, weights: int | None,
                 progress: Callable[[str], None]) -> dict[str, object]:
    clock = _StepClock(runtime)
    images = [Image.new("RGB", (64, 64), COLOURS[i % len(COLOURS)]) for i in range(rows)]
    handles = [runtime.submit_chat(img, QUESTION, max_new_tokens=tokens, temperature=1.0, seed=i, history=history)
               for i, img in enumerate(images)]
    for h in handles:
        h.text(timeout=600)
    step = clock.step_ms(rows)
    context = handles[0].prompt_tokens
    chat = runtime.scheduler.chat
    result = {"rows": rows, "context_tokens": context, "tokens": tokens,
              "step_ms": None if step is None else round(step, 2),
              "tokens_per_s": None if step is None else round(rows * 1e3 / step, 1)}
    progress(f"decode: {rows} row(s), {context} tokens of context: {result['tokens_per_s']} tokens/s")
    cache = chat.cache
    if cache is not None:
        result["bytes_per_step"] = _bytes(cache, weights, rows, context + tokens // 2)
    return result


def _bytes(cache, weights: int | None, rows: int, live: int) -> dict[str, int]:
    """Per decode step at `live` tokens per row: as fed by the cache, and the floor."""
    token = cache.layout.token_bytes
    width = min(cache.max_len, -(-(live + 1) // cache.bucket) * cache.bucket)
    fed = rows * width * token + 2 * rows * token  # the past as fed; the new K/V out, then into the cache
    floor = rows * live * token
    # The format-1 contract for comparison: past gathered (read + write), concatenated into present
    # (read + write of past + new), read by attention, one column kept.
    before = rows * live * token * 5 + rows * token
    out = {"kv_as_fed": fed, "kv_floor": floor, "kv_format1_estimate": before}
    if weights is not None:
        out.update(weights=weights, total_as_fed=weights + fed, total_floor=weights + floor,
                   ratio_to_floor=round((weights + fed) / (weights + floor), 3))
    return out


def _bare_calls(runtime, hidden: int) -> list[dict[str, object]]:
    """One `llm_decode` call (T=1) over a past held as the K/V cache holds it (contiguous, fed in
    place, new K/V bound to staging buffers): median of 5 after a warm-up."""
    cache = runtime.scheduler.chat.cache
    engine = runtime.engines["llm_decode"]
    lay = cache.layout
    out = []
    for rows, past in ((1, 16), (1, 2000), (8, 2000)):
        kv = torch.zeros((rows, lay.kv_heads, past, lay.head_dim), dtype=lay.dtype)
        feeds = {"inputs_embeds": torch.randn(rows, 1, hidden), "attention_mask": torch.ones(rows, past + 1, dtype=torch.long),
                 "position_ids": torch.full((rows, 1), past), **{n: kv for n in cache.past(0)}}
        names = ("logits", *cache.staging(rows))
        times = []
        for i in range(6):
            start = time.perf_counter()
            engine.run(feeds, outputs=cache.staging(rows), names=names)
            if i:
                times.append((time.perf_counter() - start) * 1e3)
        out.append({"rows": rows, "past": past, "ms": round(statistics.median(times), 2)})
    return out


def _turns(runtime, conversations: int = 3) -> list[float]:
    """Time to first token (ms) of each turn of a conversation, each turn following the answers
    before it: the median over `conversations` conversations, each about its own image."""
    per_turn: list[list[float]] = [[] for _ in TURNS]
    for c in range(conversations):
        history: list[tuple[str, str]] = []
        image = Image.new("RGB", (64, 64), COLOURS[c % len(COLOURS)])
        for t, question in enumerate(TURNS):
            start = time.perf_counter()
            handle = runtime.submit_chat(image, question, max_new_tokens=24, history=history or None)
            it = iter(handle)
            next(it)
            per_turn[t].append((time.perf_counter() - start) * 1e3)
            for _ in it:
                pass
            history += [("user", question), ("assistant", handle.text(timeout=600))]
    return [round(statistics.median(ms), 1) for ms in per_turn]


def bench_decode(open_runtime: Callable[..., object], hidden: int, weights: int | None = None, tokens: int = 48,
                 long_context: int = 1600, progress: Callable[[str], None] = lambda msg: None) -> dict[str, object]:
    """`open_runtime(prefix_cache_bytes=...)` gives a runtime over the engines under test; `hidden`: the
    LLM's hidden size; `weights`: bytes of `llm_decode`'s weights (its graph files), for the floor."""
    load_before = os.getloadavg()
    runtime = open_runtime()
    try:
        runtime.chat([Image.new("RGB", (64, 64))], [QUESTION], max_new_tokens=4)  # warm-up
        bare = _bare_calls(runtime, hidden)
        progress(f"llm_decode calls: {bare}")
        decode = []
        for history in (None, _history(runtime, long_context)):
            for rows in (1, 4, 8):
                decode.append(_decode_rate(runtime, rows, history, tokens, weights, progress))
        with_reuse = _turns(runtime)
    finally:
        runtime.close()
    plain = open_runtime(prefix_cache_bytes=0)
    try:
        plain.chat([Image.new("RGB", (64, 64))], [QUESTION], max_new_tokens=4)
        without_reuse = _turns(plain)
    finally:
        plain.close()
    progress(f"time to first token per turn: {without_reuse} ms without prefix reuse, {with_reuse} ms with it")
    by = {(d["rows"], d["context_tokens"] > 600): d for d in decode}
    ratios = {}
    short_1, short_8 = by[(1, False)]["tokens_per_s"], by[(8, False)]["tokens_per_s"]
    if short_1 and short_8:
        ratios["8_rows_over_1_short"] = round(short_8 / short_1, 2)
    for rows in (1, 8):
        s, lg = by[(rows, False)]["step_ms"], by[(rows, True)]["step_ms"]
        if s and lg:
            ratios[f"long_over_short_step_{rows}_rows"] = round(lg / s, 2)
    ratios["turn2_ttft_over_turn1_with_reuse"] = round(with_reuse[1] / with_reuse[0], 2)
    ratios["turn2_ttft_over_turn1_without_reuse"] = round(without_reuse[1] / without_reuse[0], 2)
    return {"decode": decode, "llm_decode_call_ms": bare, "ttft_ms_per_turn": {"with_prefix_reuse": with_reuse, "without": without_reuse},
            "ratios": ratios, "tokens": tokens, "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]}, "peak_rss_mib": round(peak_rss_mib(), 1), "machine": machine_info()}
