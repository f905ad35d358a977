"""A one-image request submitted just behind a large one: its latency with the free image rows shared
(`fair_shares`, what the scheduler does) against first come, first served (the policy it replaced,
set as the scheduler's `share_rows` here for the comparison), and what sharing costs the large request. The runtime API on a
build folder, ONNX Runtime fp32, the two policies interleaved round by round.

    .venv/bin/python bench/shared_rows.py engines/default > bench/results/default-shared-rows-cpu.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jfexport.runtime.batching.scheduler import fair_shares
from jfexport.runtime.pipelines import JanusFlowRuntime

from jfexport.tools.bench import machine_info

PROMPT = "a red circle at the top left"
LARGE = 32  # images of the large request; the default build takes 8 per engine call (16 rows under CFG)
STEPS = 10
ROUNDS = 5


def first_come_first_served(pending: Sequence[int], free: int) -> list[int]:
    """The replaced policy: each request in order takes all the rows it can."""
    shares = []
    for want in pending:
        shares.append(min(want, free))
        free -= shares[-1]
    return shares


def one_round(runtime: JanusFlowRuntime) -> dict[str, float]:
    start = time.perf_counter()
    large = runtime.submit_generate(PROMPT, n=LARGE, steps=STEPS, seed=0)
    small = runtime.submit_generate(PROMPT, n=1, steps=STEPS, seed=1)
    small.result(timeout=600)
    small_s = time.perf_counter() - start
    large.result(timeout=600)
    return {"small_s": small_s, "large_s": time.perf_counter() - start}


def main(folder: Path) -> dict[str, object]:
    runtime = JanusFlowRuntime.from_engines(folder, backend="onnxruntime")
    policies = {"shared": fair_shares, "first_come_first_served": first_come_first_served}
    runtime.submit_generate(PROMPT, n=8, steps=2).result(timeout=600)  # warm-up
    times: dict[str, dict[str, list[float]]] = {name: {"small_s": [], "large_s": []} for name in policies}
    for _ in range(ROUNDS):
        for name, policy in policies.items():
            runtime.scheduler.share_rows = policy  # read at each admission; nothing is in flight between rounds
            for key, value in one_round(runtime).items():
                times[name][key].append(value)
    runtime.close()
    result: dict[str, object] = {
        name: {key: {"median": statistics.median(v), "min": min(v), "max": max(v)} for key, v in sides.items()}
        for name, sides in times.items()
    }
    median = {name: {key: statistics.median(v) for key, v in sides.items()} for name, sides in times.items()}
    result["small_latency_ratio_fcfs_over_shared"] = (median["first_come_first_served"]["small_s"]
                                                      / median["shared"]["small_s"])
    result["large_latency_ratio_shared_over_fcfs"] = (median["shared"]["large_s"]
                                                      / median["first_come_first_served"]["large_s"])
    result["setup"] = {"engines": str(folder), "backend": "onnxruntime fp32", "prompt": PROMPT, "large_images": LARGE,
                       "small_images": 1, "steps": STEPS, "rounds": ROUNDS,
                       "timing": "from submitting the large request; the small one is submitted right after it"}
    result["machine"] = machine_info()
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
