"""`jfexport bench-serve`: closed-loop clients against a runtime, scheduler against one-at-a-time.

Each client sends its next request as soon as its previous one is answered. The same workload
(the same request kinds, prompts, questions and seeds, in the same order) runs twice in one
process: through the scheduler, and through the same runtime with every call behind one lock —
what the runtime did before it had a scheduler — so the ratio isolates what batching buys.
The workload is shared with the HTTP load generator, which sends it to a server instead.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, cast

from PIL import Image

from jfexport import defaults
from jfexport.tools.bench import machine_info, peak_rss_mib

# Prompts and questions in the bundled model's own vocabulary (its toy shapes data).
PROMPTS = ("a red circle at the top left", "a blue square at the bottom right", "a green triangle in the center",
           "a yellow star at the top right")
QUESTIONS = ("What colour is the shape?", "What shape is it?", "Where is the shape?")
COLOURS = ((220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 210, 30))


@dataclass(frozen=True)
class Workload:
    clients: int = 8
    requests: int = 64
    gen_weight: int = 1
    chat_weight: int = 1
    steps: int = defaults.STEPS
    cfg: float = defaults.CFG
    max_new_tokens: int = defaults.MAX_NEW_TOKENS

    @classmethod
    def parse_mix(cls, mix: str) -> tuple[int, int]:
        """"gen:chat" weights, e.g. "1:1", "1:0" (only images), "0:1" (only questions)."""
        try:
            gen, chat = (int(x) for x in mix.split(":"))
        except ValueError:
            raise ValueError(f"--mix must be GEN:CHAT integer weights such as 1:1, got {mix!r}") from None
        if gen < 0 or chat < 0 or gen + chat == 0:
            raise ValueError(f"--mix weights must be >= 0 and not both 0, got {mix!r}")
        return gen, chat

    def kind(self, i: int) -> str:
        """Request i's kind: the weights interleaved deterministically."""
        cycle = self.gen_weight + self.chat_weight
        return "gen" if i % cycle < self.gen_weight else "chat"

    def prompt(self, i: int) -> str:
        return PROMPTS[i % len(PROMPTS)]

    def question(self, i: int) -> tuple[Image.Image, str]:
        return Image.new("RGB", (64, 64), COLOURS[i % len(COLOURS)]), QUESTIONS[i % len(QUESTIONS)]


@dataclass
class Record:
    kind: str
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    images: int = 0
    error: str | None = None


@dataclass
class Calls:
    """How one request of each kind is sent: in process, or over HTTP."""

    generate: Callable[[int], Record]
    chat: Callable[[int], Record]


def closed_loop(calls: Calls, workload: Workload) -> tuple[list[Record], float]:
    """Run the workload with `workload.clients` threads; (records, wall seconds)."""
    lock = threading.Lock()
    next_index = [0]
    records: list[Record] = []

    def client() -> None:
        while True:
            with lock:
                i = next_index[0]
                if i >= workload.requests:
                    return
                next_index[0] += 1
            send = calls.generate if workload.kind(i) == "gen" else calls.chat
            try:
                record = send(i)
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal to the run
                record = Record(workload.kind(i), 0.0, error=f"{type(e).__name__}: {e}")
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client) for _ in range(workload.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - start


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ms = sorted(v * 1e3 for v in values)

    def at(q: float) -> float:
        return ms[min(len(ms) - 1, int(round(q * (len(ms) - 1))))]

    return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "mean_ms": statistics.fmean(ms), "count": len(ms)}


def summarize(records: list[Record], wall: float) -> dict[str, object]:
    ok = [r for r in records if r.error is None]
    by_kind = {kind: [r for r in ok if r.kind == kind] for kind in ("gen", "chat")}
    return {
        "wall_s": wall,
        "requests": len(records), "errors": len(records) - len(ok),
        "error_examples": sorted({r.error for r in records if r.error})[:3],
        "requests_per_s": len(ok) / wall,
        "images_per_s": sum(r.images for r in ok) / wall,
        "tokens_per_s": sum(r.tokens for r in ok) / wall,
        "latency": percentiles([r.latency_s for r in ok]),
        "generation_latency": percentiles([r.latency_s for r in by_kind["gen"]]),
        "chat_latency": percentiles([r.latency_s for r in by_kind["chat"]]),
        "chat_time_to_first_token": percentiles([r.ttft_s for r in by_kind["chat"] if r.ttft_s is not None]),
    }


def runtime_calls(runtime, workload: Workload, serial: threading.Lock | None = None) -> Calls:
    """In-process calls; with `serial`, every call holds it (one request at a time)."""

    def guarded(fn: Callable[[int], Record]) -> Callable[[int], Record]:
        if serial is None:
            return fn

        def run(i: int) -> Record:
            with serial:
                return fn(i)
        return run

    def generate(i: int) -> Record:
        start = time.perf_counter()
        images = runtime.generate([workload.prompt(i)], steps=workload.steps, cfg=workload.cfg, seed=i)
        return Record("gen", time.perf_counter() - start, images=len(images))

    def chat(i: int) -> Record:
        image, question = workload.question(i)
        start = time.perf_counter()
        first, tokens = None, 0
        for _ in runtime.submit_chat(image, question, max_new_tokens=workload.max_new_tokens, seed=i):
            first = first if first is not None else time.perf_counter() - start
            tokens += 1
        return Record("chat", time.perf_counter() - start, ttft_s=first, tokens=tokens)

    return Calls(guarded(generate), guarded(chat))


def ratios(batched: dict, serial: dict) -> dict[str, float | None]:
    def ratio(key: str) -> float | None:
        return batched[key] / serial[key] if serial[key] else None

    return {f"{k}_vs_one_at_a_time": ratio(k) for k in ("requests_per_s", "images_per_s", "tokens_per_s")}


def bench_serve(runtime, workload: Workload, progress: Callable[[str], None] = lambda m: None) -> dict[str, object]:
    # One warm-up request of each kind: first calls pay session and allocator set-up.
    warm = runtime_calls(runtime, workload)
    warm.generate(0), warm.chat(0)
    alone = [runtime_calls(runtime, Workload(steps=30)).generate(i).latency_s for i in range(3)]
    progress("one-at-a-time run")
    serial = summarize(*closed_loop(runtime_calls(runtime, workload, threading.Lock()), workload))
    progress("scheduler run")
    batched = summarize(*closed_loop(runtime_calls(runtime, workload), workload))
    generation_30 = statistics.median(alone) * 1e3
    ttft = cast("dict[str, float] | None", batched["chat_time_to_first_token"])  # summarize()'s percentiles
    return {
        "workload": asdict(workload),
        "backend": runtime.backend,
        "scheduler": batched,
        "one_at_a_time": serial,
        "ratios": ratios(batched, serial),
        "one_30_step_generation_alone_ms": generation_30,
        "chat_ttft_p90_over_one_generation": ttft["p90_ms"] / generation_30 if ttft else None,
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine_info(),
    }
