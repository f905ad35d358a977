"""Benchmark of the PyTorch paths on one device (issues: the fast GPU path; the GPU path to its floor).

Generation: (a) the official procedure: eager, full recompute of the sequence every step
(transformers' LlamaModel, as the demo does); (b) our eager path with the prompt K/V computed once
(the serving torch executor's step); (c) the same with the Euler step replayed as a CUDA graph;
(c2) all the steps of a call captured as one graph (what is left between (c) and (c2) is the
host's work per step). Each stage of one eager step is also timed alone next to its floor
(`step_breakdown`: which stage holds generation back).
Then the serving path, through the scheduler, each change on and off in the same run: (d) the
engine interface; (e) the fast executors (direct model calls over static buffers), eager;
(f) (e) with the step captured as a CUDA graph; (g) (e)/(f) with FP8 LLM matrix products;
(h) (e)/(f) with the Euler step compiled by torch.compile (Inductor's fusion), generation only.
Understanding, per batch: the engine interface, the static-K/V decoder (eager and CUDA graph,
one token per host round trip), and the scheduler's fast executor with device-side token choice
at k = 1 and k = `chunk` tokens per host round trip, eager and graphed, and with FP8.
The FP8 option's quality cost is measured against the same path in the model's dtype on the same
noise and question: latent error and image PSNR after `steps` steps, greedy-token agreement.
Each time is printed next to its physical floor: FLOPs / measured matmul rate and bytes /
measured memory bandwidth, from the analytic cost model.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from jfexport.core.images import initial_noise
from jfexport.reference.bundle import ModelBundle
from jfexport.reference.pipelines.generation import sample_latents
from jfexport.runtime.batching.fast_chat import DEFAULT_CHUNK
from jfexport.runtime.pipelines import JanusFlowRuntime
from jfexport.tools.bench import machine_info, summarize, sync_gpu, time_token_stream
from jfexport.tools.cost_model import Cost, floor_ms, generation_cost, llm_cost, vision_cost
from jfexport.tools.fp8 import fp8_matmuls, scaled_mm_available
from jfexport.tools.torch_paths import FastDecoder, FastSampler, step_stages, understanding_embeds

log = logging.getLogger(__name__)


def _time(fn: Callable[[], object], warmup: int, runs: int, keep: list | None = None) -> list[float]:
    """Wall times of `runs` calls after `warmup`; the last result is appended to `keep`."""
    for _ in range(warmup):
        fn()
    sync_gpu()
    out = []
    result = None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        sync_gpu()
        out.append(time.perf_counter() - start)
    if keep is not None:
        keep.append(result)
    return out


def measure_peaks(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) measured on this device: the denominators of the floors."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = statistics.median(_time(lambda: a @ b, 2, 5))
    size = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cp = statistics.median(_time(lambda: dst.copy_(src), 2, 5))
    return 2 * n**3 / mm, 2 * size / cp  # a copy reads and writes every byte


def _report(times: list[float], cost: Cost, peaks: tuple[float, float], latents: list[torch.Tensor]) -> dict[str, object]:
    # A fast path is only worth its time if it computes the same latents as the official one
    # (up to the rounding of the chosen dtype): report the distance to path (a).
    agreement = {"max_abs_vs_official": float((latents[-1].float() - latents[0].float()).abs().max()),
                 "latent_scale": float(latents[0].float().abs().max())}
    return {**summarize(times), "floor_ms": floor_ms(cost, *peaks), "tflops": cost.flops / 1e12, "gbytes": cost.bytes / 1e9,
            **agreement}


def _guarded(name: str, measure: Callable[[], dict]) -> dict:
    """`measure()`, or the error it raised: on a lent GPU one broken row must not cost the others."""
    try:
        return measure()
    except Exception as e:  # noqa: BLE001 - reported in the JSON and the log
        log.exception("bench-torch: %s failed", name)
        return {"error": f"{type(e).__name__}: {e}"}


def _sum(costs: dict[str, Cost]) -> Cost:
    return sum(costs.values(), Cost(0, 0))


@dataclass(frozen=True)
class _Variant:
    """One serving configuration of the scheduler: which executors, graphs, chunk, FP8."""

    fast: bool
    graphs: bool
    chunk: int
    fp8: bool = False
    generation: bool = True  # the chunk changes nothing for generation: time it once per executor
    compile_step: bool = False
    understanding: bool = True  # compiling the Euler step changes nothing for understanding


def _variants(cuda: bool, chunk: int, fp8: bool, compile_step: bool) -> dict[str, _Variant]:
    out = {"engine_path": _Variant(False, False, 1),
           "fast_eager_chunk1": _Variant(True, False, 1, generation=False),
           f"fast_eager_chunk{chunk}": _Variant(True, False, chunk)}
    if cuda:
        out["fast_cuda_graphs_chunk1"] = _Variant(True, True, 1, generation=False)
        out[f"fast_cuda_graphs_chunk{chunk}"] = _Variant(True, True, chunk)
    if fp8:
        out[f"fast_fp8_chunk{chunk}"] = _Variant(True, cuda, chunk, fp8=True)
    if compile_step:
        out["fast_compiled_cuda_graphs" if cuda else "fast_compiled_eager"] = _Variant(
            True, cuda, chunk, compile_step=True, understanding=False)
    return out


def _scheduler_runtime(bundle: ModelBundle, device: str, dtype: torch.dtype, variant: _Variant) -> JanusFlowRuntime:
    fast = {"fast": True, "compile_step": variant.compile_step, "cuda_graphs": variant.graphs, "chunk": variant.chunk}
    runtime = JanusFlowRuntime.from_bundle(bundle, dtype=dtype, device=device, **(fast if variant.fast else {"fast": False}))
    bundle.model.attention = "sdpa"  # every serving variant uses the fused kernels: the executors differ
    return runtime


def _psnr(a: list[Image.Image], b: list[Image.Image]) -> float:
    x = torch.tensor(np.stack([np.asarray(i) for i in a]), dtype=torch.float64)
    y = torch.tensor(np.stack([np.asarray(i) for i in b]), dtype=torch.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _padded(tokens: torch.Tensor, length: int, eos: int) -> torch.Tensor:
    """A [T,B] stream padded with EOS to `length` steps (streams end when every row has ended)."""
    pad = tokens.new_full((length - tokens.shape[0], tokens.shape[1]), eos)
    return torch.cat([tokens, pad])[:length]


def _quality(base: dict[str, Any], fp8: dict[str, Any], eos: int, tokens: int) -> dict[str, object]:
    """FP8 against the same path in the model's dtype, same noise and question."""
    za, zb = base["latents"].float(), fp8["latents"].float()
    ta, tb = _padded(base["tokens"], tokens, eos), _padded(fp8["tokens"], tokens, eos)
    same = (ta == tb).all(dim=1)
    return {"latent_max_abs_error": float((za - zb).abs().max()), "latent_rms_error": float((za - zb).pow(2).mean().sqrt()),
            "latent_rms": float(za.pow(2).mean().sqrt()), "image_psnr_db": _psnr(base["images"], fp8["images"]),
            "greedy_tokens": tokens, "greedy_agreement": float(same.float().mean()),
            "first_divergence": int(same.long().argmin()) if not bool(same.all()) else None}


@torch.inference_mode()
def bench_torch_paths(bundle: ModelBundle, device: str, dtype: torch.dtype, batches: list[int], steps: int, cfg: float,
                      warmup: int, runs: int, max_new_tokens: int, prompt: str, chunk: int = DEFAULT_CHUNK,
                      fp8: bool = True, compile_step: bool = True) -> dict[str, object]:
    dev = torch.device(device)
    model = bundle.model.to(device=dev, dtype=dtype)
    proc = bundle.require_processor()
    size = bundle.latent_size
    grid = bundle.config.image_grid(size)
    elem = torch.finfo(dtype).bits // 8
    peaks = measure_peaks(dev, dtype)
    generation: dict[str, object] = {}
    results: dict[str, object] = {
        "device": machine_info(), "dtype": str(dtype).replace("torch.", ""), "steps": steps, "cfg": cfg,
        "latent": size, "image_tokens": grid * grid, "chunk": chunk,
        "measured_peaks": {"matmul_tflops": peaks[0] / 1e12, "copy_gbytes_per_s": peaks[1] / 1e9},
        "generation": generation,
    }
    for batch in batches:
        tokens = proc.generation_tokens([prompt] * batch)
        ids, mask = tokens.input_ids.to(dev), tokens.attention_mask.to(dev)
        z0 = initial_noise((batch, bundle.latent_channels, size, size), 0, dtype).to(dev)
        prompt_len = ids.shape[1] - 1
        row: dict[str, object] = {"prompt_tokens": prompt_len}
        model.attention = "sdpa"
        latents: list[torch.Tensor] = []
        official = generation_cost(bundle.config, batch, prompt_len, steps, size, elem, recompute=True)
        row["a_official_eager_recompute"] = _report(
            _time(lambda: sample_latents(model, ids, mask, z0, steps, cfg, proc.tokenizer.pad_id, schedule="recompute"),
                  warmup, runs, latents), _sum(official), peaks, latents)
        cached = generation_cost(bundle.config, batch, prompt_len, steps, size, elem, recompute=False)
        eager = FastSampler(model, grid, cuda_graphs=False)
        row["b_eager_prompt_kv"] = _report(
            _time(lambda: eager.sample(ids, mask, z0, steps, cfg, proc.tokenizer.pad_id), warmup, runs, latents),
            _sum(cached), peaks, latents)
        for name, whole_loop in (("c_cuda_graph_step", False), ("c2_cuda_graph_whole_loop", True)):
            if dev.type == "cuda":
                graphed = FastSampler(model, grid, cuda_graphs=True, whole_loop=whole_loop)
                row[name] = _guarded(name, lambda: _report(
                    _time(lambda: graphed.sample(ids, mask, z0, steps, cfg, proc.tokenizer.pad_id), warmup, runs, latents),
                    _sum(cached), peaks, latents))
            else:
                row[name] = None  # CUDA graphs need a CUDA device
        row["step_breakdown"] = _guarded("step_breakdown", lambda: _step_breakdown(
            model, grid, ids, mask, z0, steps, cfg, proc.tokenizer.pad_id, warmup, runs, cached, peaks))
        generation[f"batch_{batch}"] = row

    image = Image.new("RGB", (bundle.image_size, bundle.image_size), (200, 30, 30))
    question = "Describe the image."
    eos = proc.tokenizer.eos_id
    seq = int(proc.understanding_batch([question], [image]).input_ids.shape[1])
    understanding: dict[str, Any] = {"prompt_tokens": seq, "new_tokens": max_new_tokens}
    for batch in batches:
        prefill = vision_cost(bundle.config, batch, elem) + llm_cost(bundle.config, batch, seq, 0, elem, with_logits=True)
        per_token = llm_cost(bundle.config, batch, 1, seq + max_new_tokens // 2, elem, with_logits=True)
        understanding[f"batch_{batch}"] = {"time_to_first_token_floor_ms": floor_ms(prefill, *peaks),
                                           "decode_ceiling_steps_per_s": 1e3 / floor_ms(per_token, *peaks)}

    def static_kv(decoder: FastDecoder, batch: int) -> Callable[[], Iterator[torch.Tensor]]:
        def stream() -> Iterator[torch.Tensor]:
            inputs = proc.understanding_batch([question] * batch, [image] * batch)
            return decoder.decode(understanding_embeds(model, inputs), inputs.attention_mask, max_new_tokens, eos)
        return stream

    decoders = {"static_kv_eager": FastDecoder(model)}
    if dev.type == "cuda":
        decoders["static_kv_cuda_graph"] = FastDecoder(model, cuda_graphs=True)
    for name, decoder in decoders.items():
        for batch in batches:
            understanding[f"batch_{batch}"][name] = time_token_stream(static_kv(decoder, batch), warmup, runs)

    serving: dict[str, dict[str, Any]] = {f"batch_{b}": {} for b in batches}
    outputs: dict[str, dict[str, Any]] = {}
    for name, variant in _variants(dev.type == "cuda", chunk, fp8, compile_step).items():
        with fp8_matmuls(model) if variant.fp8 else nullcontext():
            runtime = _scheduler_runtime(bundle, device, dtype, variant)
            try:
                result = _guarded(name, lambda: _measure_serving(runtime, variant, name, serving, batches, prompt, steps,
                                                                 cfg, image, question, warmup, runs, max_new_tokens,
                                                                 peaks, bundle, elem))
                if "error" in result:
                    for batch in batches:
                        serving[f"batch_{batch}"].setdefault(name, {})["error"] = result["error"]
                else:
                    outputs[name] = result
            finally:
                runtime.close()
    for batch in batches:
        rows = serving[f"batch_{batch}"]
        # Same noise through the scheduler: the fast executors must land where the engine path does.
        reference = rows["engine_path"].pop("_latents", None)
        for variant_row in rows.values():
            variant_latents = variant_row.pop("_latents", None)
            if variant_latents is not None and reference is not None:
                variant_row["generation"]["max_abs_vs_engine_path"] = float((variant_latents - reference).abs().max())
    results["serving_through_the_scheduler"] = serving
    fast_name = f"fast_cuda_graphs_chunk{chunk}" if dev.type == "cuda" else f"fast_eager_chunk{chunk}"
    if fp8 and all(n in outputs for n in (f"fast_fp8_chunk{chunk}", fast_name)):
        fp8_name = f"fast_fp8_chunk{chunk}"
        base_name = f"fast_cuda_graphs_chunk{chunk}" if dev.type == "cuda" else f"fast_eager_chunk{chunk}"
        kernel = "torch._scaled_mm" if scaled_mm_available(dev, dtype) else "dequantised emulation"
        results["fp8_quality"] = {"against": base_name, "batch": batches[0], "kernel": kernel,
                                  "matrix_products": "decoder projections (q,k,v,o,gate,up,down)",
                                  **_quality(outputs[base_name], outputs[fp8_name], eos, max_new_tokens)}
    model.attention = "math"
    results["understanding"] = understanding
    return results


def _step_breakdown(model, grid: int, ids: torch.Tensor, mask: torch.Tensor, z0: torch.Tensor, steps: int, cfg: float,
                    pad_id: int, warmup: int, runs: int, costs: dict[str, Cost], peaks: tuple[float, float]) -> dict:
    """Each stage of one eager Euler step (`torch_paths.step_stages`) timed alone, next to its floor;
    `sum_ms` against the graphed step says how much of a step is launches rather than kernels."""
    sampler = FastSampler(model, grid)
    buffers, _ = sampler.prepare(ids, mask, z0, steps, cfg, pad_id)
    stages = step_stages(sampler.executor, buffers)
    for _, fn in stages:  # every stage's inputs exist before any is timed alone
        fn()
    out: dict[str, Any] = {}
    for name, fn in stages:
        times = _time(fn, warmup, max(runs, 5))
        cost = costs.get(name)
        out[name] = {**summarize(times), "floor_ms": None if cost is None else floor_ms(cost.scaled(1 / steps), *peaks)}
    out["sum_ms"] = sum(out[name]["median_ms"] for name, _ in stages)
    return out


def _measure_serving(runtime: JanusFlowRuntime, variant: _Variant, name: str, serving: dict, batches: list[int], prompt: str,
                     steps: int, cfg: float, image: Image.Image, question: str, warmup: int, runs: int,
                     max_new_tokens: int, peaks: tuple[float, float], bundle: ModelBundle, elem: int) -> dict[str, object]:
    """Time one variant at every batch; returns its batch-1 outputs for the FP8 comparison."""
    outputs: dict[str, object] = {}
    size = bundle.latent_size
    for batch in batches:
        row: dict[str, object] = {}
        if variant.generation:
            kept: list[torch.Tensor] = []
            times = _time(lambda: runtime.generate_latents([prompt] * batch, steps=steps, cfg=cfg, seed=0),
                          warmup, runs, kept)
            prompt_len = len(runtime.processor.generation_ids(prompt)) - 1
            cost = _sum(generation_cost(bundle.config, batch, prompt_len, steps, size, elem, recompute=False))
            row["generation"] = {**summarize(times), "floor_ms": floor_ms(cost, *peaks)}
            row["_latents"] = kept[0].float().cpu()
            if batch == batches[0]:
                outputs["latents"] = kept[0].cpu()
                outputs["images"] = runtime.decode_images(kept[0])
        if variant.understanding:
            row["understanding"] = time_token_stream(
                lambda: runtime.chat_stream([image] * batch, [question] * batch, max_new_tokens=max_new_tokens),
                warmup, runs)
        if batch == batches[0] and variant.understanding:
            outputs["tokens"] = torch.stack(list(runtime.chat_stream([image], [question], max_new_tokens=max_new_tokens)))
        serving[f"batch_{batch}"][name] = row
    return outputs
