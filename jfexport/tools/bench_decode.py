"""`jfexport bench-serve --decode`: decoding through the public API, against the K/V cache's floor.

Reports, for a build served in process:
- decode tokens/s at 1, 4 and 8 rows, at short context (one image + question) and long context
  (the same question after a long conversation history): the median time between two
  consecutive batched decode steps of that many rows (a batch observer timestamps each step), so
  rows that end early never dilute the figure;
- time to first token of each turn of a 3-turn conversation, with and without prefix reuse;
- one bare `llm_decode` call at 1 row over 16 and 2,000 past tokens, and at 8 rows over 2,000
  (or the longest past the build allows);
- bytes per decode step as fed (weights once, the past as the cache feeds it: every row `width`
  columns, the new K/V written out and into the cache) against the floor (weights once + each
  row's live K/V once). These are computed from the shapes fed, not read from hardware counters.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable

import torch
from PIL import Image

from jfexport.tools.bench import machine_info, peak_rss_mib

if TYPE_CHECKING:
    from jfexport.runtime.pipelines import JanusFlowRuntime

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
    return turns(max(1, 1 + (min(tokens, runtime.max_len - 64) - base) // per))  # room for the answer


class _StepClock:
    """Timestamps of batched decode steps, by rows."""

    def __init__(self, runtime):
        self.times: list[tuple[float, str, int]] = []
        runtime.add_batch_observer(lambda kind, rows: self.times.append((time.perf_counter(), kind, rows)))

    def step_ms(self, rows: int) -> float | None:
        gaps = [(b[0] - a[0]) * 1e3 for a, b in zip(self.times, self.times[1:])
                if a[1] == b[1] == "chat" and a[2] == b[2] == rows]
        return statistics.median(gaps) if gaps else None


def _decode_steps(runtime, rows: int, history, tokens: int) -> tuple[float | None, int]:
    """(median ms between two consecutive decode steps of `rows` rows, prompt tokens) of one batch."""
    clock = _StepClock(runtime)
    images = [Image.new("RGB", (64, 64), COLOURS[i % len(COLOURS)]) for i in range(rows)]
    handles = [runtime.submit_chat(img, QUESTION, max_new_tokens=tokens, temperature=1.0, seed=i, history=history)
               for i, img in enumerate(images)]
    for h in handles:
        h.text(timeout=600)
    return clock.step_ms(rows), handles[0].prompt_tokens


def _decode_rate(rows: int, kind: str, context: int, steps: list[float], tokens: int, cache, weights: int | None,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    best, median = min(steps), statistics.median(steps)
    result = {"rows": rows, "context": kind, "context_tokens": context, "tokens": tokens, "runs": len(steps),
              "step_ms_min": round(best, 2), "step_ms_median": round(median, 2),
              "tokens_per_s_best": round(rows * 1e3 / best, 1), "tokens_per_s_median": round(rows * 1e3 / median, 1)}
    progress(f"decode: {rows} row(s), {context} tokens of context: {result['tokens_per_s_best']} tokens/s "
             f"(best of {len(steps)}; median {result['tokens_per_s_median']})")
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


def _bare_calls(runtime, hidden: int, rounds: int) -> list[dict[str, object]]:
    """One `llm_decode` call (T=1) over a past held as the K/V cache holds it (contiguous, fed in
    place, new K/V bound to staging buffers): 5 calls after a warm-up per round, rounds interleaved."""
    cache = runtime.scheduler.chat.cache
    engine = runtime.engines["llm_decode"]
    lay = cache.layout
    longest = min(2000, runtime.max_len - 1)  # the past a build allows
    shapes = ((1, 16), (1, longest), (8, longest))
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    for _ in range(rounds):
        for rows, past in shapes:
            kv = torch.zeros((rows, lay.kv_heads, past, lay.head_dim), dtype=lay.dtype)
            feeds = {"inputs_embeds": torch.randn(rows, 1, hidden),
                     "attention_mask": torch.ones(rows, past + 1, dtype=torch.long),
                     "position_ids": torch.full((rows, 1), past), **{n: kv for n in cache.past(0)}}
            names = ("logits", *cache.staging(rows))
            for i in range(6):
                start = time.perf_counter()
                engine.run(feeds, outputs=cache.staging(rows), names=names)
                if i:
                    times[(rows, past)].append((time.perf_counter() - start) * 1e3)
    return [{"rows": r, "past": p, "ms_min": round(min(t), 2), "ms_median": round(statistics.median(t), 2)}
            for (r, p), t in times.items()]


def _turns(runtime, conversations: int = 3) -> dict[str, list[float]]:
    """Time to first token (ms) of each turn of a conversation, each turn following the answers
    before it: the best and the median over `conversations` conversations, each about its own image."""
    per_turn: list[list[float]] = [[] for _ in TURNS]
    for c in range(conversations):
        history: list[tuple[str, str]] = []
        # An image no earlier request showed: the first turn starts cold, with prefix reuse or without.
        image = Image.new("RGB", (64, 64), (15 + 40 * c, 90, 170))
        for t, question in enumerate(TURNS):
            start = time.perf_counter()
            handle = runtime.submit_chat(image, question, max_new_tokens=24, history=history or None)
            it = iter(handle)
            next(it)
            per_turn[t].append((time.perf_counter() - start) * 1e3)
            for _ in it:
                pass
            history += [("user", question), ("assistant", handle.text(timeout=600))]
    return {"min": [round(min(ms), 1) for ms in per_turn], "median": [round(statistics.median(ms), 1) for ms in per_turn]}


def bench_decode(open_runtime: Callable[..., JanusFlowRuntime], hidden: int, weights: int | None = None, tokens: int = 48,
                 long_context: int = 1600, rounds: int = 3,
                 progress: Callable[[str], None] = lambda msg: None) -> dict[str, object]:
    """`open_runtime(prefix_cache_bytes=...)` gives a runtime over the engines under test; `hidden`: the
    LLM's hidden size; `weights`: bytes of `llm_decode`'s weights (its graph files), for the floor.

    Every configuration runs `rounds` times, the rounds interleaved, so that a burst of load from
    other processes does not land on one configuration only: the best run is the machine's figure,
    the median says how noisy it was."""
    load_before = os.getloadavg()
    runtime = open_runtime()
    try:
        runtime.chat([Image.new("RGB", (64, 64))], [QUESTION], max_new_tokens=4)  # warm-up
        bare = _bare_calls(runtime, hidden, rounds)
        progress(f"llm_decode calls: {bare}")
        configs = [(rows, kind, history) for kind, history in (("short", None), ("long", _history(runtime, long_context)))
                   for rows in (1, 4, 8)]
        steps: dict[int, list[float]] = {i: [] for i in range(len(configs))}
        contexts: dict[int, int] = {}
        for _ in range(rounds):
            for i, (rows, _, history) in enumerate(configs):
                step, contexts[i] = _decode_steps(runtime, rows, history, tokens)
                if step is not None:
                    steps[i].append(step)
        cache = runtime.scheduler.chat.cache
        decode = [_decode_rate(rows, kind, contexts[i], steps[i], tokens, cache, weights, progress)
                  for i, (rows, kind, _) in enumerate(configs) if steps[i]]
        with_reuse = _turns(runtime)
    finally:
        runtime.close()
    plain = open_runtime(prefix_cache_bytes=0)
    try:
        plain.chat([Image.new("RGB", (64, 64))], [QUESTION], max_new_tokens=4)
        without_reuse = _turns(plain)
    finally:
        plain.close()
    progress(f"time to first token per turn (best): {without_reuse['min']} ms without prefix reuse, "
             f"{with_reuse['min']} ms with it")
    by = {(d["rows"], d["context"] == "long"): d for d in decode}
    ratios = {}
    for stat in ("min", "median"):
        ratios[f"8_rows_over_1_short_{stat}"] = round(by[(1, False)][f"step_ms_{stat}"] * 8
                                                      / by[(8, False)][f"step_ms_{stat}"], 2)
        for rows in (1, 8):
            ratios[f"long_over_short_step_{rows}_rows_{stat}"] = round(
                by[(rows, True)][f"step_ms_{stat}"] / by[(rows, False)][f"step_ms_{stat}"], 2)
        for name, turns in (("with_reuse", with_reuse), ("without_reuse", without_reuse)):
            ratios[f"turn2_ttft_over_turn1_{name}_{stat}"] = round(turns[stat][1] / turns[stat][0], 2)
    return {"decode": decode, "llm_decode_call_ms": bare,
            "ttft_ms_per_turn": {"with_prefix_reuse": with_reuse, "without": without_reuse},
            "ratios": ratios, "tokens": tokens, "rounds": rounds,
            "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
            "peak_rss_mib": round(peak_rss_mib(), 1), "machine": machine_info()}
