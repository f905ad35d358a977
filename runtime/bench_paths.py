"""Benchmark of the PyTorch generation paths on one device (issue: the fast GPU path).

(a) the official procedure: eager, full recompute of the sequence every step (transformers'
    LlamaModel, as the demo does); (b) our eager path with the prompt K/V computed once and
    precomputed time embeddings; (c) the same with the Euler step replayed as a CUDA graph.
Understanding (batch 1) is timed over the engine interface (the graph contract: present = past +
new per step) and over the static-K/V decoder, eager and as a CUDA graph.
Each is printed next to its physical floor: FLOPs / measured matmul rate and bytes / measured
memory bandwidth, from the analytic cost model.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterator

import torch
from PIL import Image

from jfexport.reference.bundle import ModelBundle
from jfexport.reference.pipelines.generation import sample_latents
from jfexport.reference.pipelines.images import initial_noise

from .bench import machine_info, summarize, sync_gpu, time_token_stream
from .cost_model import Cost, floor_ms, generation_cost, llm_cost, vision_cost
from .pipelines import JanusFlowRuntime
from .torch_fast import FastDecoder, FastSampler, understanding_embeds


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


def _sum(costs: dict[str, Cost]) -> Cost:
    return sum(costs.values(), Cost(0, 0))


@torch.inference_mode()
def bench_torch_paths(bundle: ModelBundle, device: str, dtype: torch.dtype, batches: list[int], steps: int, cfg: float,
                      warmup: int, runs: int, max_new_tokens: int, prompt: str) -> dict[str, object]:
    dev = torch.device(device)
    model = bundle.model.to(device=dev, dtype=dtype)
    proc = bundle.processor
    size = bundle.latent_size
    grid = bundle.config.image_grid(size)
    elem = torch.finfo(dtype).bits // 8
    peaks = measure_peaks(dev, dtype)
    results: dict[str, object] = {
        "device": machine_info(), "dtype": str(dtype).replace("torch.", ""), "steps": steps, "cfg": cfg,
        "latent": size, "image_tokens": grid * grid,
        "measured_peaks": {"matmul_tflops": peaks[0] / 1e12, "copy_gbytes_per_s": peaks[1] / 1e9},
        "generation": {},
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
        if dev.type == "cuda":
            graphed = FastSampler(model, grid, cuda_graphs=True)
            row["c_cuda_graph_step"] = _report(
                _time(lambda: graphed.sample(ids, mask, z0, steps, cfg, proc.tokenizer.pad_id), warmup, runs, latents),
                _sum(cached), peaks, latents)
        else:
            row["c_cuda_graph_step"] = None  # CUDA graphs need a CUDA device
        results["generation"][f"batch_{batch}"] = row

    image = Image.new("RGB", (bundle.image_size, bundle.image_size), (200, 30, 30))
    question = "Describe the image."
    runtime = JanusFlowRuntime.from_bundle(bundle, dtype=dtype, device=device)
    eos = proc.tokenizer.eos_id

    def static_kv(decoder: FastDecoder) -> Callable[[], Iterator[torch.Tensor]]:
        def stream() -> Iterator[torch.Tensor]:
            batch = proc.understanding_batch([question], [image])
            return decoder.decode(understanding_embeds(model, batch), batch.attention_mask, max_new_tokens, eos)
        return stream

    paths = {"engine_interface": lambda: runtime.chat_stream([image], [question], max_new_tokens=max_new_tokens),
             "static_kv_eager": static_kv(FastDecoder(model))}
    if dev.type == "cuda":
        paths["static_kv_cuda_graph"] = static_kv(FastDecoder(model, cuda_graphs=True))
    seq = int(proc.understanding_batch([question], [image]).input_ids.shape[1])
    prefill = vision_cost(bundle.config, 1, elem) + llm_cost(bundle.config, 1, seq, 0, elem, with_logits=True)
    per_token = llm_cost(bundle.config, 1, 1, seq + max_new_tokens // 2, elem, with_logits=True)
    understanding: dict[str, object] = {
        "prompt_tokens": seq, "time_to_first_token_floor_ms": floor_ms(prefill, *peaks),
        "decode_ceiling_tokens_per_s": 1e3 / floor_ms(per_token, *peaks),
    }
    for name, open_stream in paths.items():
        understanding[name] = time_token_stream(open_stream, warmup, runs)
    model.attention = "math"
    results["understanding_batch_1"] = understanding
    return results
