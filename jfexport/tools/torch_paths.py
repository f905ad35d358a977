"""The fast PyTorch paths for GPUs, one whole request batch at a time (the benchmark's
before-the-scheduler rows): bf16, fused attention, prompt K/V computed once, static K/V buffers
for decoding, and steps captured as CUDA graphs.

Generation: the serving torch executor's Euler step (`generation_step.cfg_euler_step` over
`TorchGenerationExecutor`) reads and writes static buffers, which CUDA-graph capture requires, and
is captured once per (batch, prompt-width bucket), then replayed by every request of that shape.
Understanding: `FastDecoder` (below). Captures are kept in small LRU caches keyed by bucketed shapes, so memory
stays bounded whatever prompt lengths arrive.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

import torch

from jfexport.core.graph_contract import PRESENT, kv_name
from jfexport.core.layout import cfg_prompt_rows, offset_positions, understanding_positions
from jfexport.core.schedulers import FlowEulerCFGScheduler, StopRule
from jfexport.reference.modules.janusflow import JanusFlowModel
from jfexport.runtime.backends.torch_backend import exact_fp32
from jfexport.runtime.batching.decode_step import DecodeRow
from jfexport.runtime.batching.fast_chat import TorchChatExecutor
from jfexport.runtime.batching.generation_step import PromptKV, StepBuffers, guided_euler, step_inputs, step_velocity
from jfexport.runtime.batching.kv_cache import KVCache, KVLayout
from jfexport.runtime.batching.torch_generation import TorchGenerationExecutor
from jfexport.runtime.batching.torch_step import DECODE_BUCKET, capture_graph
from jfexport.runtime.errors import NonFiniteOutput, check_finite
from jfexport.runtime.lru import LRU


def step_stages(ex: TorchGenerationExecutor, b: StepBuffers) -> list[tuple[str, Callable[[], None]]]:
    """`cfg_euler_step` split into its stages, named as in `cost_model.generation_cost`, for the
    benchmark to time one by one (which stage holds a step back); the last one writes `b.z`."""
    tmp: dict[str, torch.Tensor] = {}

    def encoder() -> None:
        tmp["t_emb"], tmp["embeds"], tmp["skip"] = step_inputs(ex, b)

    def llm_decode() -> None:
        tmp["hidden"] = ex.hidden(tmp["embeds"], b.mask, b.positions, b.past)

    def decoder() -> None:
        tmp["v_raw"] = step_velocity(ex, tmp["hidden"], tmp["skip"], tmp["t_emb"])

    def cfg_euler() -> None:
        b.z.copy_(guided_euler(b, tmp["v_raw"]))

    return [("gen_encoder", encoder), ("llm_decode", llm_decode), ("gen_decoder", decoder), ("cfg_euler", cfg_euler)]


class FastSampler:
    """Text-to-image for one request batch: prompt K/V once, then the Euler steps of the serving
    torch executor (`TorchGenerationExecutor`) over its static buffers.

    `cuda_graphs` replays each step as a CUDA graph (one launch per step); `whole_loop` captures all
    the steps of a call in one graph instead, so the host launches once per image batch: what is
    left between the two is the host's per-step work (copies and a launch).
    """

    def __init__(self, model: JanusFlowModel, grid: int, cuda_graphs: bool = False, whole_loop: bool = False):
        self.executor = TorchGenerationExecutor(model, grid, cuda_graphs or whole_loop)
        self.whole_loop = whole_loop
        # One captured loop per (batch, prompt-width bucket, steps), with its timestep table: requests of
        # a shape replay the same graph after loading their prompt K/V, noise, cfg and dt into its buffers.
        self._loops: LRU[tuple[int, int, int], tuple[StepBuffers, torch.Tensor]] = LRU()

    def sample(self, cond_ids: torch.Tensor, cond_mask: torch.Tensor, z0: torch.Tensor, steps: int, cfg_weight: float,
               pad_id: int, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        with torch.inference_mode(), exact_fp32(self.executor.dtype):
            b, timesteps = self.prepare(cond_ids, cond_mask, z0, steps, cfg_weight, pad_id)
            return self._run(b, timesteps, on_step)

    def prepare(self, cond_ids: torch.Tensor, cond_mask: torch.Tensor, z0: torch.Tensor, steps: int, cfg_weight: float,
                pad_id: int) -> tuple[StepBuffers, torch.Tensor]:
        """The step buffers loaded for this call at its first step (prompt K/V computed here) and the
        model timesteps of all its steps [steps]."""
        ex, device = self.executor, z0.device
        batch = z0.shape[0]
        ids, prompt_mask, pad = cfg_prompt_rows(cond_ids.to(device), cond_mask.to(device), pad_id)
        past = ex.prefill(ids, prompt_mask, offset_positions(pad, ids.shape[1]))
        # Each prompt's CFG pair from its BOS on, as the scheduler's prefill keeps it.
        prompts = [PromptKV([(k[[i, batch + i], :, s:], v[[i, batch + i], :, s:]) for k, v in past],
                            prompt_mask[[i, batch + i], s:]) for i, s in enumerate(pad[:batch].tolist())]
        schedule = FlowEulerCFGScheduler(steps, cfg_weight, torch.float32)
        if self.whole_loop and device.type == "cuda":
            key = (batch, ex.width(prompts), steps)
            entry = self._loops.get(key)
            if entry is None:
                entry = (ex.new_buffers(prompts, z0[0]), torch.zeros(steps, dtype=torch.float32, device=device))
                self._loops.put(key, entry)
            b, timesteps = entry
            timesteps.copy_(schedule.timesteps)
        else:
            b, timesteps = ex.buffers(prompts, z0[0]), schedule.timesteps.to(device)
        b.load_prompts(prompts)
        b.load_step(z0.float(), timesteps[:1].expand(batch), torch.full((batch, 1, 1, 1), cfg_weight),
                    schedule.dt.expand(batch).reshape(batch, 1, 1, 1))
        return b, timesteps

    def _run(self, b: StepBuffers, timesteps: torch.Tensor, on_step: Callable[[int, int], None] | None) -> torch.Tensor:
        ex, steps = self.executor, timesteps.shape[0]

        def step(k: int) -> None:
            b.timesteps.copy_(timesteps[k].expand_as(b.timesteps))
            ex.compute(b)
            b.z.copy_(b.out)

        def loop() -> None:
            for k in range(steps):
                step(k)

        graphed = ex.cuda_graphs and b.z.device.type == "cuda"
        if graphed and self.whole_loop:
            if b.graph is None:
                b.graph = self._capture(loop, b.z)
            b.graph.replay()
            if on_step is not None:
                on_step(steps, steps)
            return b.z.clone()
        for k in range(steps):
            b.timesteps.copy_(timesteps[k].expand_as(b.timesteps))
            ex.launch(b)
            if graphed and b.graph is None:
                raise RuntimeError("the Euler step could not be captured as a CUDA graph")
            b.z.copy_(b.out)
            if on_step is not None:
                on_step(k + 1, steps)
        return b.z.clone()

    @staticmethod
    def _capture(run: Callable[[], None], z: torch.Tensor) -> torch.cuda.CUDAGraph:
        """Capture `run`; the warm-up runs' Euler updates are undone so the capture has no side effect."""
        saved = z.clone()
        graph = capture_graph(run)
        z.copy_(saved)
        return graph


class FastDecoder:
    """Greedy decoding for understanding, one token per step, over a static K/V cache, optionally as
    a CUDA graph: the serving fast path's decode step (`TorchChatExecutor`) on one whole batch.

    The prompt K/V are put once into a `KVCache` of L columns per row (L = prompt + answer budget,
    rounded up to a bucket), rows left-aligned; each step writes its K/V in place at each row's
    next column. Shapes never change, so on CUDA the step (embedding, decoder stack, logits, token
    choice) is captured once per (batch, L) and replayed: per token the host launches one graph
    and the GPU streams the weights once.
    """

    def __init__(self, model: JanusFlowModel, cuda_graphs: bool = False):
        self.model = model
        self.executor = TorchChatExecutor(model, cuda_graphs, chunk=1)
        self._caches: LRU[tuple[int, int], KVCache] = LRU()

    def decode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_id: int,
               on_logits: Callable[[torch.Tensor], None] | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token [B] of every row, as the reference `decode_tokens` does greedily (finished rows
        get EOS)."""
        # A generator: the contexts are entered on each resumption, not once for the whole stream.
        stream = self._decode(inputs_embeds, attention_mask, max_new_tokens, eos_id, on_logits)
        while True:
            with torch.inference_mode(), exact_fp32(inputs_embeds.dtype):
                token = next(stream, None)
            if token is None:
                return
            yield token

    def _cache(self, past: list[tuple[torch.Tensor, torch.Tensor]], batch: int, length: int) -> KVCache:
        key = (batch, length)
        cache = self._caches.get(key)
        if cache is None:
            k0 = past[0][0]
            cache = KVCache(KVLayout(len(past), k0.shape[1], k0.shape[3], k0.dtype), batch, length, k0.device,
                            DECODE_BUCKET)
            self._caches.put(key, cache)
        while cache.rows:
            cache.release(cache.rows - 1)
        return cache

    def _decode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_id: int,
                on_logits: Callable[[torch.Tensor], None] | None) -> Iterator[torch.Tensor]:
        model = self.model
        batch, prompt_len = attention_mask.shape
        mask = attention_mask.long().to(inputs_embeds.device)
        hidden, past, _ = model.llm(inputs_embeds, mask, understanding_positions(mask))
        logits = model.logits(hidden[:, -1]).float()
        check_finite("llm", "logits", logits)
        length = -(-(prompt_len + max_new_tokens) // DECODE_BUCKET) * DECODE_BUCKET
        cache = self._cache(past, batch, length)
        present = {}
        for layer, (k, v) in enumerate(past):
            present[kv_name(PRESENT, layer, "key")], present[kv_name(PRESENT, layer, "value")] = k, v
        for i, n in enumerate(mask.sum(dim=1).tolist()):
            cache.put(cache.acquire(), 0, present, i, prompt_len - n, n)
        if on_logits is not None:
            on_logits(logits)
        rule = StopRule(eos_id, max_new_tokens)
        token = logits.argmax(dim=-1)
        draws = torch.Generator("cpu")  # greedy rows never use their draws; the device chooser takes them all the same
        rows = [DecodeRow(t, cache.lengths[i], 0.0, 1.0, draws, max_new_tokens - 1, eos_id,
                          rule.finish_reason(t, 1) is not None, keep_logits=on_logits is not None)
                for i, t in enumerate(token.tolist())]
        yield token
        slots = list(range(batch))
        for _ in range(max_new_tokens - 1):
            if all(r.finished for r in rows):
                return
            cache.fit(max(cache.lengths) + 1)
            out = self.executor.decode(cache, rows, slots, 1, on_logits is not None)
            bad = [i for i, step in enumerate(out.first_bad) if step >= 0]
            if bad:
                raise NonFiniteOutput(f"llm: output 'logits' has NaN/Inf values in rows {bad}")
            if on_logits is not None:
                kept = out.logits or []
                on_logits(torch.stack([row[0] for row in kept if row is not None]).to(logits.device))
            rows = [replace(r, token=t[0], length=cache.lengths[i], remaining=r.remaining - 1, finished=f)
                    for i, (r, t, f) in enumerate(zip(rows, out.tokens, out.finished))]
            yield torch.tensor([t[0] for t in out.tokens], device=logits.device)


def understanding_embeds(model: JanusFlowModel, batch) -> torch.Tensor:
    """inputs_embeds of a processor understanding batch on the model's device, image embeddings spliced in."""
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    with torch.inference_mode(), exact_fp32(dtype):
        return model.prepare_inputs_embeds(batch.input_ids.to(dev), batch.pixel_values.to(dev, dtype),
                                           batch.images_seq_mask.to(dev), batch.images_emb_mask.to(dev))
