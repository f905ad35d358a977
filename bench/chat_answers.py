"""Chat `n` answers in one request against the same answers as n requests one after the other, and
what logprobs add: the runtime API on a build folder, ONNX Runtime fp32, rounds interleaved.

    .venv/bin/python bench/chat_answers.py engines/default > bench/results/default-chat-answers-cpu.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

from jfexport.tools.bench import machine_info

QUESTION = "Describe the picture."
ANSWERS = 4
MAX_NEW_TOKENS = 32
ROUNDS = 5


def answer_tokens(runtime: JanusFlowRuntime, image: Image.Image, n: int, seed: int = 0, top: int | None = None) -> int:
    """Tokens of all n answers of one request, sampled at temperature 1 (answer i seeded seed + i)."""
    handle = runtime.submit_chat(image, QUESTION, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=seed, n=n,
                                 top_logprobs=top)
    answers = [handle.choice(i) for i in range(n)]
    for answer in answers:
        answer.text()  # until it ends
    return sum(len(answer.token_ids) for answer in answers)


def main(folder: Path) -> dict[str, object]:
    runtime = JanusFlowRuntime.from_engines(folder, backend="onnxruntime")
    image = Image.new("RGB", (64, 64), (210, 30, 30))
    sides: dict[str, Callable[[], int]] = {
        "one_request_n4": lambda: answer_tokens(runtime, image, ANSWERS),
        "four_requests_one_after_the_other": lambda: sum(answer_tokens(runtime, image, 1, seed=i) for i in range(ANSWERS)),
        "one_request_n4_top_logprobs_5": lambda: answer_tokens(runtime, image, ANSWERS, top=5),
    }
    for side in sides.values():  # warm-up
        side()
    times: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, int] = {}
    for _ in range(ROUNDS):
        for name, side in sides.items():
            start = time.perf_counter()
            tokens[name] = side()
            times[name].append(time.perf_counter() - start)
    runtime.close()
    result: dict[str, object] = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "tokens": tokens[name]}
        for name, t in times.items()
    }
    median = {name: statistics.median(t) for name, t in times.items()}
    result["speedup_of_n4_over_four_requests"] = median["four_requests_one_after_the_other"] / median["one_request_n4"]
    result["logprobs_added_fraction"] = median["one_request_n4_top_logprobs_5"] / median["one_request_n4"] - 1
    result["setup"] = {"engines": str(folder), "backend": "onnxruntime fp32", "question": QUESTION, "answers": ANSWERS,
                       "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "rounds": ROUNDS}
    result["machine"] = machine_info()
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
