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
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, MutableMapping

import torch
from PIL import Image

from jfexport.runtime.engine import Engine
from jfexport.runtime.int8_arithmetic import describe_cpu

if TYPE_CHECKING:
    from jfexport.runtime.pipelines import JanusFlowRuntime


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
        self.device = getattr(engine, "device", torch.device("cpu"))  # where the K/V cache is allocated
        self._engine = engine
        self._timer = timer

    def run(self, feeds, outputs=None, names=None):
        start = time.perf_counter()
        result = self._engine.run(feeds, outputs, names)
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


def _one_stream(open_stream: Callable[[], Iterator[torch.Tensor]]) -> tuple[float, int, float | None]:
    """(time to first token, tokens, decode tokens/s or None) of one answer (the GPU, if any, synchronised)."""
    start = time.perf_counter()
    stream = open_stream()
    next(stream)
    sync_gpu()
    first = time.perf_counter()
    n = sum(1 for _ in stream)
    sync_gpu()
    return first - start, n + 1, (n / (time.perf_counter() - first) if n else None)


def _stream_summary(samples: list[tuple[float, int, float | None]]) -> dict[str, object]:
    rates = [r for _, _, r in samples if r is not None]
    return {"time_to_first_token": summarize([t for t, _, _ in samples]),
            # Random weights may hit EOS early: the count says how many tokens the rate is over.
            "tokens_per_answer": statistics.median(n for _, n, _ in samples),
            "decode_tokens_per_s": statistics.median(rates) if rates else None,
            "decode_tokens_per_s_min_max": [min(rates), max(rates)] if rates else None}


def time_token_stream(open_stream: Callable[[], Iterator[torch.Tensor]], warmup: int, runs: int,
                      timer: StageTimer | None = None) -> dict[str, object]:
    """Time to first token and decode rate of a token stream."""
    samples = []
    for i in range(warmup + runs):
        if i == warmup and timer is not None:
            timer.clear()
        result = _one_stream(open_stream)
        if i >= warmup:
            samples.append(result)
    return _stream_summary(samples)


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
        "cpu": describe_cpu(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def thread_settings(threads: int, runtimes: Mapping[str, JanusFlowRuntime]) -> dict[str, object]:
    """Give the reference (this thread's torch) `threads` threads, and report what each side runs with,
    read back from torch and ONNX Runtime (0 there: its default, one per physical core)."""
    torch.set_num_threads(threads)
    report: dict[str, object] = {"reference_torch": torch.get_num_threads()}
    for label, runtime in runtimes.items():
        sessions = [e.session for e in runtime.engines.values() if hasattr(e, "session")]
        report[label] = {"scheduler_torch": runtime.scheduler.torch_threads(),
                         "onnxruntime_intra_op": sorted({s.get_session_options().intra_op_num_threads
                                                         for s in sessions}) or None}
    return report


def bench_sides(runtimes: Mapping[str, JanusFlowRuntime], reference, prompts: list[str], steps: int, cfg: float, warmup: int,
                runs: int, stream: Callable[[object], Iterator[torch.Tensor]]) -> dict[str, dict]:
    """Each runtime (by label) and the reference ("reference"), their runs interleaved: run i of every
    side before run i + 1 of any, so a slow spell of the machine falls on all sides alike. Generation
    end to end (and per stage for the runtimes), then understanding."""
    sides = {**runtimes, "reference": reference}
    timers = {label: StageTimer() for label in runtimes}
    for label, timer in timers.items():
        # In place: the scheduler holds this mapping and must run the timed proxies.
        engines = runtimes[label].engines
        if not isinstance(engines, MutableMapping):
            raise TypeError(f"{label}: its engines ({type(engines).__name__}) cannot take the timed proxies in place")
        engines.update(timer.wrap(engines))
    generation: dict[str, list[float]] = {label: [] for label in sides}
    for i in range(warmup + runs):
        for label, pipe in sides.items():
            if i == warmup and label in timers:
                timers[label].clear()
            start = time.perf_counter()
            pipe.generate(prompts, steps=steps, cfg=cfg)
            if i >= warmup:
                generation[label].append(time.perf_counter() - start)
    results: dict[str, dict[str, object]] = {label: {"end_to_end": summarize(times)} for label, times in generation.items()}
    for label, timer in timers.items():
        results[label]["stages_per_call"] = {n: summarize(t) for n, t in timer.times.items() if n != "vision_encoder"}
        timer.clear()
    answers: dict[str, list] = {label: [] for label in sides}
    for i in range(warmup + runs):
        for label, pipe in sides.items():
            if i == warmup and label in timers:
                timers[label].clear()
            result = _one_stream(lambda: stream(pipe))
            if i >= warmup:
                answers[label].append(result)
    for label in sides:
        results[label]["understanding"] = _stream_summary(answers[label])
    for label, timer in timers.items():
        results[label]["understanding_stages_per_call"] = {n: summarize(t) for n, t in timer.times.items()}
    return results


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def bench_pipelines(runtime, reference, prompt: str, steps: int, cfg: float, batch: int, warmup: int, runs: int,
                    max_new_tokens: int, question: str, image: Image.Image, threads: int = 1) -> dict[str, object]:
    """Measure `runtime` (a JanusFlowRuntime) stage by stage and `reference` end to end, runs interleaved,
    the reference's torch at `threads` threads (open the runtime with the same)."""
    prompts = [prompt] * batch

    def stream(pipeline) -> Iterator[torch.Tensor]:
        return pipeline.chat_stream([image], [question], max_new_tokens=max_new_tokens)

    threads_used = thread_settings(threads, {"runtime": runtime})
    both = bench_sides({"runtime": runtime}, reference, prompts, steps, cfg, warmup, runs, stream)
    rt, ref = both["runtime"], both["reference"]
    understanding, ref_understanding = rt["understanding"], ref["understanding"]
    return {
        "threads": threads_used,
        "generation": {
            "batch": batch, "steps": steps, "cfg": cfg,
            "end_to_end": rt["end_to_end"],
            "stages_per_call": rt["stages_per_call"],
            "reference_eager_end_to_end": ref["end_to_end"],
            "speedup_vs_reference": ref["end_to_end"]["median_ms"] / rt["end_to_end"]["median_ms"],
            # The spread of the ratio: slowest reference over fastest runtime run, and the reverse.
            "speedup_vs_reference_min_max": [ref["end_to_end"]["min_ms"] / rt["end_to_end"]["max_ms"],
                                             ref["end_to_end"]["max_ms"] / rt["end_to_end"]["min_ms"]],
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


def _resident_mib() -> float | None:
    """Resident memory of this process now (Linux VmRSS), None where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bench_precisions(open_runtime: Callable[[str], JanusFlowRuntime], precisions: list[str], files_mib: Mapping[str, float],
                     reference, prompt: str, steps: int, cfg: float, batch: int, warmup: int, runs: int,
                     max_new_tokens: int, question: str, image: Image.Image, threads: int = 1) -> dict[str, object]:
    """Several precisions of one build (`open_runtime(precision)`, with `threads` threads) and the reference
    eager pipeline (torch at `threads` threads), runs interleaved; ratios of each precision against the
    first one and against the reference.

    The runtimes are opened one after the other, each recording how much the process's resident
    memory rose while it opened (Linux), then measured side by side."""
    prompts = [prompt] * batch

    def stream(pipeline) -> Iterator[torch.Tensor]:
        return pipeline.chat_stream([image], [question], max_new_tokens=max_new_tokens)

    runtimes: dict[str, JanusFlowRuntime] = {}
    opened_mib: dict[str, float | None] = {}
    try:
        for precision in precisions:
            before = _resident_mib()
            runtimes[precision] = open_runtime(precision)
            after = _resident_mib()
            opened_mib[precision] = after - before if before is not None and after is not None else None
        threads_used = thread_settings(threads, runtimes)
        measured = bench_sides(runtimes, reference, prompts, steps, cfg, warmup, runs, stream)
    finally:
        for runtime in runtimes.values():
            runtime.close()
    results = {p: {**measured[p], "rss_mib_opened": opened_mib[p], "files_mib": files_mib[p]} for p in precisions}
    reference_result = measured["reference"]
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
    return {"threads": threads_used, "generation": {"batch": batch, "steps": steps, "cfg": cfg},
            "understanding": {"max_new_tokens": max_new_tokens}, "precisions": results, "reference_eager": reference_result,
            "ratios": ratios, "peak_rss_mib": peak_rss_mib(), "machine": machine_info()}
