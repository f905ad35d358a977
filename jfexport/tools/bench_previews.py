"""`jfexport bench-serve --previews K`: what streamed previews cost the requests that ask for none.

Image-only closed-loop clients (bench-serve's prompts, seeds and clients) on one warm runtime, in
one process, two phases alternating round by round (so that a drift of the shared machine falls
on both): `plain`, every request without previews; `mixed`, the same requests with the odd ones
asking for K previews each (interleaved with the others in the same batches). Reported: images/s
of each phase and of each class of the mixed phase, their latencies, and the cost to the others:
the mean latency of the requests without previews in the mixed phase over the plain phase's, less 1.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from typing import Any, Callable

from jfexport.tools.bench import machine_info, peak_rss_mib
from jfexport.tools.bench_serve import Calls, Record, Workload, closed_loop, percentiles


def _calls(runtime, workload: Workload, previews: int) -> Calls:
    """Request i asks for `previews` previews when i is odd (none when `previews` is 0); they are read
    as a streaming client reads them, then the images."""

    def generate(i: int) -> Record:
        start = time.perf_counter()
        asked = previews if i % 2 else 0
        handle = runtime.submit_generate(workload.prompt(i), steps=workload.steps, cfg=workload.cfg, seed=i,
                                         previews=asked)
        seen = sum(1 for _ in handle.previews())
        images = handle.result()
        if seen != asked:
            raise RuntimeError(f"request {i}: {seen} previews, {asked} asked")
        return Record(f"gen-{asked}", time.perf_counter() - start, images=len(images))

    return Calls(generate, generate)


class _WorkerTime:
    """The worker's seconds and rows per kind of batched call (each call's time: since the previous
    call ended, so queue waits between iterations land on the next call)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, int]] = []

    def __call__(self, kind: str, rows: int) -> None:
        self.events.append((time.perf_counter(), kind, rows))

    def take(self) -> dict[str, dict[str, float]]:
        events, self.events = self.events, []
        out: dict[str, dict[str, float]] = {}
        for (before, _, _), (at, kind, rows) in zip(events, events[1:]):
            entry = out.setdefault(kind, {"seconds": 0.0, "calls": 0, "rows": 0})
            entry["seconds"] += at - before
            entry["calls"] += 1
            entry["rows"] += rows
        return out


def _phase(records: list[Record], wall: float, worker: dict) -> dict[str, object]:
    ok = [r for r in records if r.error is None]
    out: dict[str, object] = {"wall_s": wall, "requests": len(records), "errors": len(records) - len(ok),
                              "error_examples": sorted({r.error for r in records if r.error})[:3],
                              "images_per_s": sum(r.images for r in ok) / wall, "worker": worker}
    for kind in sorted({r.kind for r in ok}):
        mine = [r for r in ok if r.kind == kind]
        out[kind] = {"images_per_s": sum(r.images for r in mine) / wall, "latency": percentiles([r.latency_s for r in mine])}
    return out


def bench_previews(runtime, workload: Workload, previews: int, rounds: int = 3,
                   progress: Callable[[str], None] = lambda m: None) -> dict[str, object]:
    _calls(runtime, Workload(clients=1, requests=2, steps=workload.steps), previews).generate(1)  # warm-up
    worker = _WorkerTime()
    runtime.add_batch_observer(worker)
    phases: dict[str, list[dict]] = {"plain": [], "mixed": []}
    for r in range(rounds):
        for name, k in (("plain", 0), ("mixed", previews)):
            progress(f"round {r + 1}/{rounds}: {name}")
            worker.take()
            phases[name].append(_phase(*closed_loop(_calls(runtime, workload, k), workload), worker.take()))

    def mean_of(name: str, *keys: str) -> float:
        values: list[float] = []
        for p in phases[name]:
            v: Any = p
            for key in keys:
                v = v[key]
            values.append(float(v))
        return statistics.fmean(values)

    plain_ms = mean_of("plain", "gen-0", "latency", "mean_ms")
    others_ms = mean_of("mixed", "gen-0", "latency", "mean_ms")
    return {
        "workload": asdict(workload), "previews_per_streamed_request": previews, "rounds": rounds,
        "backend": runtime.backend,
        "images_per_s": {"plain": mean_of("plain", "images_per_s"), "mixed": mean_of("mixed", "images_per_s"),
                         "mixed_without_previews": mean_of("mixed", "gen-0", "images_per_s"),
                         f"mixed_with_{previews}_previews": mean_of("mixed", f"gen-{previews}", "images_per_s")},
        "mean_latency_ms": {"plain": plain_ms, "mixed_without_previews": others_ms,
                            f"mixed_with_{previews}_previews": mean_of("mixed", f"gen-{previews}", "latency", "mean_ms")},
        "cost_to_requests_without_previews": others_ms / plain_ms - 1,
        "worker_vae_seconds": {name: statistics.fmean(p["worker"].get("vae", {}).get("seconds", 0.0) for p in phases[name])
                               for name in phases},
        "worker_step_seconds": {name: statistics.fmean(p["worker"].get("generation", {}).get("seconds", 0.0)
                                                       for p in phases[name]) for name in phases},
        "phases": phases,
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine_info(),
    }
