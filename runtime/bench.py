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
    """Median, p90 and the spread (min, max) of wall times in seconds, as milliseconds."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_ms": statistics.median(ordered) * 1e3, "p90_ms": p90 * 1e3, "min_ms": ordered[0] * 1e3,
            "max_ms": ordered[-1] * 1e3, "runs": len(ordered)}


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


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def _bench_runtime(runtime, prompts: list[str], steps: int, cfg: float, warmup: int, runs: int,
                   stream: Callable[[object], Iterator[torch.Tensor]]) -> dict[str, object]:
    """Generation end to end and per stage, then understanding, of one runtime."""
    timer = StageTimer()
    # In place: the scheduler holds this mapping and must run the timed proxies.
    runtime.engines.update(timer.wrap(runtime.engines))
    gen_total = timed_runs(lambda: runtime.generate(prompts, steps=steps, cfg=cfg), warmup, runs, timer)
    stages = {name: summarize(times) for name, times in timer.times.items() if name != "vision_encoder"}
    timer.clear()
    understanding = time_token_stream(lambda: stream(runtime), warmup, runs, timer)
    return {"end_to_end": summarize(gen_total), "stages_per_call": stages, "understanding": understanding,
            "understanding_stages_per_call": {name: summarize(times) for name, times in timer.times.items()}}


def _bench_reference(reference, prompts: list[str], steps: int, cfg: float, warmup: int, runs: int,
                     stream: Callable[[object], Iterator[torch.Tensor]]) -> dict[str, object]:
    understanding = time_token_stream(lambda: stream(reference), warmup, runs)
    return {"end_to_end": summarize(timed_runs(lambda: reference.generate(prompts, steps=steps, cfg=cfg), warmup, runs)),
            "understanding": understanding}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def bench_pipelines(runtime, reference, prompt: str, steps: int, cfg: float, batch: int, warmup: int, runs: int,
                    max_new_tokens: int, question: str, image: Image.Image) -> dict[str, object]:
    """Measure `runtime` (a JanusFlowRuntime) stage by stage and `reference` end to end."""
    prompts = [prompt] * batch

    def stream(pipeline) -> Iterator[torch.Tensor]:
        return pipeline.chat_stream([image], [question], max_new_tokens=max_new_tokens)

    rt = _bench_runtime(runtime, prompts, steps, cfg, warmup, runs, stream)
    ref = _bench_reference(reference, prompts, steps, cfg, warmup, runs, stream)
    understanding, ref_understanding = rt["understanding"], ref["understanding"]
    return {
        "generation": {
            "batch": batch, "steps": steps, "cfg": cfg,
            "end_to_end": rt["end_to_end"],
            "stages_per_call": rt["stages_per_call"],
            "reference_eager_end_to_end": ref["end_to_end"],
            "speedup_vs_reference": ref["end_to_end"]["median_ms"] / rt["end_to_end"]["median_ms"],
        },
        "understanding": {
            "max_new_tokens": max_new_tokens,
            **understanding,
            "stages_per_call": rt["understanding_stages_per_call"],
            "reference_eager": ref_understanding,
            "time_to_first_token_speedup_vs_reference":
                ref_understanding["time_to_first_token"]["median_ms"] / understanding["time_to_first_token"]["median_ms"],
            "decode_speedup_vs_reference": _ratio(understanding["decode_tokens_per_s"],
                                                  ref_understanding["decode_tokens_per_s"]),
        },
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine_info(),
    }


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count of this process (Linux clear_refs 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_since_reset_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bench_precisions(open_runtime: Callable[[str], object], precisions: list[str], files_mib: Mapping[str, float],
                     reference, prompt: str, steps: int, cfg: float, batch: int, warmup: int, runs: int,
                     max_new_tokens: int, question: str, image: Image.Image) -> dict[str, object]:
    """Several precisions of one build (`open_runtime(precision)`), one after the other, and the reference
    eager pipeline, in one run; ratios of each precision against the first one and against the reference.

    Each runtime is closed before the next opens, and the process's peak RSS is restarted in between
    (Linux clear_refs), recorded with the resident memory at that point."""
    prompts = [prompt] * batch

    def stream(pipeline) -> Iterator[torch.Tensor]:
        return pipeline.chat_stream([image], [question], max_new_tokens=max_new_tokens)

    results: dict[str, dict] = {}
    for precision in precisions:
        reset = _reset_peak_rss()
        start = _peak_rss_since_reset_mib()  # just reset: the resident memory now
        runtime = open_runtime(precision)
        try:
            results[precision] = _bench_runtime(runtime, prompts, steps, cfg, warmup, runs, stream)
        finally:
            runtime.close()
        # Freed memory is not always returned to the system: a later precision starts from what the earlier
        # ones left resident, so its peak is only comparable as the rise above its start.
        results[precision]["rss_mib_at_start"] = start if reset else None
        results[precision]["peak_rss_mib"] = _peak_rss_since_reset_mib() if reset else None
        results[precision]["files_mib"] = files_mib[precision]
    reference_result = _bench_reference(reference, prompts, steps, cfg, warmup, runs, stream)
    base = precisions[0]

    def gen_ms(r: dict) -> float:
        return r["end_to_end"]["median_ms"]

    def decode(r: dict) -> float | None:
        return r["understanding"]["decode_tokens_per_s"]

    ratios = {}
    for precision, r in results.items():
        ratios[precision] = {
            f"generation_speedup_vs_{base}": gen_ms(results[base]) / gen_ms(r),
            "generation_speedup_vs_reference": gen_ms(reference_result) / gen_ms(r),
            f"decode_speedup_vs_{base}": _ratio(decode(r), decode(results[base])),
            "decode_speedup_vs_reference": _ratio(decode(r), decode(reference_result)),
            f"time_to_first_token_speedup_vs_{base}": results[base]["understanding"]["time_to_first_token"]["median_ms"]
            / r["understanding"]["time_to_first_token"]["median_ms"],
        }
    return {"generation": {"batch": batch, "steps": steps, "cfg": cfg}, "understanding": {"max_new_tokens": max_new_tokens},
            "precisions": results, "reference_eager": reference_result, "ratios": ratios,
            "peak_rss_mib": peak_rss_mib(), "machine": machine_info()}
