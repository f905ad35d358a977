"""Benchmarks: per-stage latency through timing proxies around the engines, end-to-end times,
understanding time-to-first-token and decode rate, peak memory, and the reference eager
pipeline measured in the same run."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections import defaultdict
from typing import Callable, Iterator, Mapping

import torch
from PIL import Image

from .engine import Engine


class StageTimer:
    """Collects wall times per graph name (CUDA-synchronised when the outputs live on a GPU)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)

    def wrap(self, engines: Mapping[str, Engine]) -> dict[str, Engine]:
        return {name: _TimedEngine(engine, self) for name, engine in engines.items()}

    def clear(self) -> None:
        self.times.clear()


class _TimedEngine:
    def __init__(self, engine: Engine, timer: StageTimer):
        self.name = engine.name
        self._engine = engine
        self._timer = timer

    def run(self, feeds, outputs=None):
        start = time.perf_counter()
        result = self._engine.run(feeds, outputs)
        if any(t.is_cuda for t in result.values()):
            torch.cuda.synchronize()
        self._timer.times[self.name].append(time.perf_counter() - start)
        return result


def summarize(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_ms": statistics.median(ordered) * 1e3, "p90_ms": p90 * 1e3, "runs": len(ordered)}


def timed_runs(fn: Callable[[], object], warmup: int, runs: int, timer: StageTimer | None = None) -> list[float]:
    """Wall times of `runs` calls after `warmup` untimed ones (whose stage times are discarded)."""
    for _ in range(warmup):
        fn()
    if timer is not None:
        timer.clear()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def time_token_stream(open_stream: Callable[[], Iterator[torch.Tensor]], warmup: int, runs: int,
                      timer: StageTimer | None = None) -> dict[str, object]:
    """Time to first token and decode rate of a token stream (the GPU, if any, is synchronised)."""
    ttft: list[float] = []
    rates: list[float] = []
    counts: list[int] = []
    for i in range(warmup + runs):
        if i == warmup and timer is not None:
            timer.clear()
        start = time.perf_counter()
        stream = open_stream()
        next(stream)
        sync_gpu()
        first = time.perf_counter()
        n = sum(1 for _ in stream)
        sync_gpu()
        if i >= warmup:
            ttft.append(first - start)
            counts.append(n + 1)
            if n:
                rates.append(n / (time.perf_counter() - first))
    return {"time_to_first_token": summarize(ttft),
            # Random weights may hit EOS early: the count says how many tokens the rate is over.
            "tokens_per_answer": statistics.median(counts),
            "decode_tokens_per_s": statistics.median(rates) if rates else None}


def sync_gpu() -> None:
    """Wait for queued GPU work, so wall-clock timings include it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_info() -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def bench_pipelines(runtime, reference, prompt: str, steps: int, cfg: float, batch: int, warmup: int, runs: int,
                    max_new_tokens: int, question: str, image: Image.Image) -> dict[str, object]:
    """Measure `runtime` (a JanusFlowRuntime) stage by stage and `reference` end to end."""
    timer = StageTimer()
    # In place: the scheduler holds this mapping and must run the timed proxies.
    runtime.engines.update(timer.wrap(runtime.engines))
    prompts = [prompt] * batch

    gen_total = timed_runs(lambda: runtime.generate(prompts, steps=steps, cfg=cfg), warmup, runs, timer)
    stages = {name: summarize(times) for name, times in timer.times.items() if name != "vision_encoder"}
    timer.clear()

    def stream(pipeline) -> Iterator[torch.Tensor]:
        return pipeline.chat_stream([image], [question], max_new_tokens=max_new_tokens)

    understanding = time_token_stream(lambda: stream(runtime), warmup, runs, timer)
    und_stages = {name: summarize(times) for name, times in timer.times.items()}
    ref_understanding = time_token_stream(lambda: stream(reference), warmup, runs)

    ref_total = timed_runs(lambda: reference.generate(prompts, steps=steps, cfg=cfg), warmup, runs)
    runtime_ms = summarize(gen_total)["median_ms"]
    reference_ms = summarize(ref_total)["median_ms"]
    return {
        "generation": {
            "batch": batch, "steps": steps, "cfg": cfg,
            "end_to_end": summarize(gen_total),
            "stages_per_call": stages,
            "reference_eager_end_to_end": summarize(ref_total),
            "speedup_vs_reference": reference_ms / runtime_ms,
        },
        "understanding": {
            "max_new_tokens": max_new_tokens,
            **understanding,
            "stages_per_call": und_stages,
            "reference_eager": ref_understanding,
            "time_to_first_token_speedup_vs_reference":
                ref_understanding["time_to_first_token"]["median_ms"] / understanding["time_to_first_token"]["median_ms"],
            "decode_speedup_vs_reference": (understanding["decode_tokens_per_s"] / ref_understanding["decode_tokens_per_s"]
                                            if understanding["decode_tokens_per_s"] and ref_understanding["decode_tokens_per_s"]
                                            else None),
        },
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine_info(),
    }
