"""A small request submitted just behind large ones: its latency with the free rows shared (`fair_shares`,
what the scheduler does) against first come, first served (the policies it replaced, set as the scheduler's
`share_rows` here for the comparison), and what sharing costs the large requests. Images: one image behind a
32-image request (the replaced image policy let the first request take all the rows it could). Questions: a
one-answer question behind three questions with n=16 (the replaced chat policy admitted a question only
whole, first come first served). The runtime API on a build folder, ONNX Runtime fp32, the policies
interleaved round by round.

    .venv/bin/python bench/shared_rows.py engines/default > bench/results/default-shared-rows-cpu.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from jfexport.runtime.batching.scheduler import fair_shares
from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

from jfexport.tools.bench import machine_info

PROMPT = "a red circle at the top left"
LARGE = 32  # images of the large request; the default build takes 8 per engine call (16 rows under CFG)
STEPS = 10
ROUNDS = 5
# Questions: the default model answers this image with tokens up to any limit (greedy), so every
# answer is as long as its max_new_tokens.
IMAGE = Image.new("RGB", (64, 64), (200, 30, 30))
QUESTION = "What colour is the shape?"
LARGE_QUESTIONS, LARGE_N, LARGE_TOKENS, SMALL_TOKENS = 3, 16, 96, 8


def first_come_first_served(pending: Sequence[int], free: int) -> list[int]:
    """The replaced policy: each request in order takes all the rows it can."""
    shares = []
    for want in pending:
        shares.append(min(want, free))
        free -= shares[-1]
    return shares


def whole_first_come_first_served(pending: Sequence[int], free: int) -> list[int]:
    """The replaced chat policy: each question in order, whole or not at all; one that does not fit holds
    back those behind it."""
    shares = [0] * len(pending)
    for i, want in enumerate(pending):
        if want > free:
            break
        shares[i], free = want, free - want
    return shares


def questions_round(runtime: JanusFlowRuntime) -> dict[str, float]:
    start = time.perf_counter()
    large = [runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=LARGE_TOKENS, temperature=0.0, n=LARGE_N)
             for _ in range(LARGE_QUESTIONS)]
    small = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=SMALL_TOKENS, temperature=0.0)
    small.text(timeout=600)
    small_s = time.perf_counter() - start
    for handle in large:
        for i in range(handle.n):
            handle.choice(i).text(timeout=600)
    return {"small_s": small_s, "large_s": time.perf_counter() - start}


def images_round(runtime: JanusFlowRuntime) -> dict[str, float]:
    start = time.perf_counter()
    large = runtime.submit_generate(PROMPT, n=LARGE, steps=STEPS, seed=0)
    small = runtime.submit_generate(PROMPT, n=1, steps=STEPS, seed=1)
    small.result(timeout=600)
    small_s = time.perf_counter() - start
    large.result(timeout=600)
    return {"small_s": small_s, "large_s": time.perf_counter() - start}


def compare(runtime: JanusFlowRuntime, one_round: Callable[[JanusFlowRuntime], dict[str, float]],
            replaced: Callable[[Sequence[int], int], list[int]]) -> dict[str, object]:
    policies = {"shared": fair_shares, "first_come_first_served": replaced}
    times: dict[str, dict[str, list[float]]] = {name: {"small_s": [], "large_s": []} for name in policies}
    for _ in range(ROUNDS):
        for name, policy in policies.items():
            runtime.scheduler.share_rows = policy  # read at each admission; nothing is in flight between rounds
            for key, value in one_round(runtime).items():
                times[name][key].append(value)
    result: dict[str, object] = {
        name: {key: {"median": statistics.median(v), "min": min(v), "max": max(v)} for key, v in sides.items()}
        for name, sides in times.items()
    }
    median = {name: {key: statistics.median(v) for key, v in sides.items()} for name, sides in times.items()}
    result["small_latency_ratio_fcfs_over_shared"] = (median["first_come_first_served"]["small_s"]
                                                      / median["shared"]["small_s"])
    result["large_latency_ratio_shared_over_fcfs"] = (median["shared"]["large_s"]
                                                      / median["first_come_first_served"]["large_s"])
    return result


def main(folder: Path) -> dict[str, object]:
    runtime = JanusFlowRuntime.from_engines(folder, backend="onnxruntime")
    runtime.submit_generate(PROMPT, n=8, steps=2).result(timeout=600)  # warm-up
    runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=4).text(timeout=600)
    result: dict[str, object] = {
        "images": {**compare(runtime, images_round, first_come_first_served),
                   "setup": {"prompt": PROMPT, "large_images": LARGE, "small_images": 1, "steps": STEPS}},
        "questions": {**compare(runtime, questions_round, whole_first_come_first_served),
                      "setup": {"large_questions": LARGE_QUESTIONS, "large_n": LARGE_N, "large_tokens": LARGE_TOKENS,
                                "small_n": 1, "small_tokens": SMALL_TOKENS, "greedy": True,
                                "slots": runtime.scheduler.chat.slots}},
    }
    runtime.close()
    result["setup"] = {"engines": str(folder), "backend": "onnxruntime fp32", "rounds": ROUNDS,
                       "timing": "from submitting the large requests; the small one is submitted right after them"}
    result["machine"] = machine_info()
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
