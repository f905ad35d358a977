"""The fast PyTorch paths for GPUs, one whole request batch at a time (the benchmark's
before-the-scheduler rows): bf16, fused attention, prompt K/V computed once, per-step constants
precomputed, static K/V buffers for decoding, and steps captured as CUDA graphs.

Generation: what depends only on the step index is hoisted out of the loop (the time embeddings
of all steps come from one batched call); the Euler step (`cfg_euler_step`, the serving fast
path's own) reads and writes static buffers, which CUDA-graph capture requires, and is captured once
per prompt-length bucket, then replayed by every request of that shape. Understanding:
`FastDecoder` (below). Captures are kept in small LRU caches keyed by bucketed shapes, so memory
stays bounded whatever prompt lengths arrive.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

import torch

from jfexport.core.graph_contract import PRESENT, kv_name
from jfexport.core.layout import cfg_prompt_rows, offset_positions, understanding_positions
from jfexport.core.schedulers import FlowEulerCFGScheduler, StopRule, cfg_velocity, euler_step
from jfexport.reference.modules.janusflow import JanusFlowModel
from jfexport.runtime.backends.torch_backend import exact_fp32
from jfexport.runtime.errors import NonFiniteOutput, check_finite
from jfexport.runtime.lru import LRU
from jfexport.runtime.batching.decode_step import DecodeRow
from jfexport.runtime.batching.fast_chat import TorchChatExecutor
from jfexport.runtime.batching.kv_cache import KVCache, KVLayout
from jfexport.runtime.batching.torch_step import (DECODE_BUCKET, capture_graph, cfg_euler_step, gen_decoder, gen_encoder,
                                                   time_embedding)
from jfexport.runtime.trt_plan import prompt_bucket


class _StepState:
    """The static buffers one Euler step reads and writes, and (once captured) its CUDA graph."""

    def __init__(self, z: torch.Tensor, t_emb: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 past: list[tuple[torch.Tensor, torch.Tensor]], cfg: torch.Tensor, dt: torch.Tensor):
        self.z, self.t_emb, self.mask, self.positions, self.past = z, t_emb, mask, positions, past
        self.cfg, self.dt = cfg, dt
        self.timesteps = None  # `cfg_euler_step` reads the precomputed t_emb
        self.t_embs: torch.Tensor | None = None  # [steps, D]: what a whole-loop graph reads
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, z: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             past: list[tuple[torch.Tensor, torch.Tensor]], cfg: torch.Tensor, dt: torch.Tensor) -> None:
        self.cfg.copy_(cfg)
        self.dt.copy_(dt)
        self.z.copy_(z)
        self.mask.copy_(mask)
        self.positions.copy_(positions)
        for (k, v), (k_new, v_new) in zip(self.past, past):
            k.copy_(k_new)
            v.copy_(v_new)


def step_stages(model: JanusFlowModel, s) -> list[tuple[str, Callable[[], None]]]:
    """`cfg_euler_step` split into its stages, named as in `cost_model.generation_cost`, for the
    benchmark to time one by one (which stage holds a step back); the last one writes `s.z`."""
    tmp: dict[str, object] = {}

    def encoder() -> None:
        tmp["enc"] = gen_encoder(model, s.z, time_embedding(model, s))

    def llm_decode() -> None:
        tmp["hidden"] = model.llm(tmp["enc"][2], s.mask, s.positions, s.past)[0]

    def decoder() -> None:
        x_emb, t2, _ = tmp["enc"]
        tmp["v_raw"] = gen_decoder(model, tmp["hidden"], x_emb, t2)

    def cfg_euler() -> None:
        v, batch = tmp["v_raw"], s.z.shape[0]
        s.z.copy_(euler_step(s.z, cfg_velocity(v[:batch], v[batch:], s.cfg), s.dt))

    return [("gen_encoder", encoder), ("llm_decode", llm_decode), ("gen_decoder", decoder), ("cfg_euler", cfg_euler)]


class FastSampler:
    """Text-to-image for one request batch: prompt K/V once, then the Euler steps over static buffers.

    `cuda_graphs` replays each step as a CUDA graph (one launch per step); `whole_loop` captures all
    the steps of a call in one graph instead, so the host launches once per image batch: what is
    left between the two is the host's per-step work (a copy and a launch).
    """

    def __init__(self, model: JanusFlowModel, grid: int, cuda_graphs: bool = False, whole_loop: bool = False):
        self.model = model
        self.grid = grid
        self.cuda_graphs = cuda_graphs or whole_loop
        self.whole_loop = whole_loop
        # One captured step (or loop) per (batch, prompt-length bucket[, steps]): requests of a
        # bucket replay the same graph after copying their prompt K/V, noise, cfg and dt into its buffers.
        self._captured: LRU[tuple[int, ...], _StepState] = LRU()

    def sample(self, cond_ids: torch.Tensor, cond_mask: torch.Tensor, z0: torch.Tensor, steps: int, cfg_weight: float,
               pad_id: int, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        with torch.inference_mode(), exact_fp32(next(self.model.parameters()).dtype):
            state, t_embs = self.prepare(cond_ids, cond_mask, z0, steps, cfg_weight, pad_id)
            return self._run(state, t_embs, on_step)

    def prepare(self, cond_ids: torch.Tensor, cond_mask: torch.Tensor, z0: torch.Tensor, steps: int, cfg_weight: float,
                pad_id: int) -> tuple[_StepState, torch.Tensor]:
        """The step buffers loaded for this call (prompt K/V computed here) and the time embeddings [steps, D]."""
        model, device = self.model, z0.device
        dtype = next(model.parameters()).dtype
        batch = z0.shape[0]
        graphed = self.cuda_graphs and device.type == "cuda"
        cond_ids, cond_mask = cond_ids.to(device), cond_mask.to(device)
        if graphed:
            # Left-pad (masked) to the bucket: similar prompt lengths then share one captured graph.
            width = prompt_bucket(cond_ids.shape[1] - 1, 1 << 30) + 1
            extra = width - cond_ids.shape[1]
            cond_ids = torch.nn.functional.pad(cond_ids, (extra, 0), value=pad_id)
            cond_mask = torch.nn.functional.pad(cond_mask, (extra, 0), value=0)
        ids, prompt_mask, pad = cfg_prompt_rows(cond_ids, cond_mask, pad_id)
        prompt_len = ids.shape[1]
        tail = 1 + self.grid**2
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(2 * batch, tail)], dim=1)
        positions = offset_positions(pad, prompt_len + tail)
        _, past, _ = model.llm(model.embed_tokens(ids), prompt_mask, positions[:, :prompt_len])
        step_positions = positions[:, prompt_len:].contiguous()
        schedule = FlowEulerCFGScheduler(steps, cfg_weight, torch.float32)
        t_embs = model.vision_gen_enc_model.time_embedding(schedule.timesteps.to(device), dtype)  # [steps, D]
        cfg = torch.full((batch, 1, 1, 1), cfg_weight, dtype=torch.float32, device=device)
        dt = schedule.dt.to(device)

        key = (batch, prompt_len, steps) if self.whole_loop else (batch, prompt_len)
        state = self._captured.get(key) if graphed else None
        if state is None:
            state = _StepState(z0.float().clone(), torch.empty(batch, t_embs.shape[1], dtype=dtype, device=device), mask,
                               step_positions, [(k.clone(), v.clone()) for k, v in past], cfg, dt.clone())
            state.t_embs = t_embs.clone()
            if graphed:
                self._captured.put(key, state)
        else:
            state.load(z0.float(), mask, step_positions, past, cfg, dt)
            state.t_embs.copy_(t_embs)
        return state, state.t_embs

    def _run(self, state: _StepState, t_embs: torch.Tensor, on_step: Callable[[int, int], None] | None) -> torch.Tensor:
        model, steps = self.model, t_embs.shape[0]

        def step() -> None:
            state.z.copy_(cfg_euler_step(model, state))

        def loop() -> None:
            for k in range(steps):
                state.t_emb.copy_(t_embs[k].expand_as(state.t_emb))
                step()

        graphed = self.cuda_graphs and state.z.device.type == "cuda"
        if graphed and self.whole_loop:
            if state.graph is None:
                state.graph = self._capture(loop, state.z)
            state.graph.replay()
            if on_step is not None:
                on_step(steps, steps)
            return state.z.clone()
        if graphed and state.graph is None:
            state.t_emb.copy_(t_embs[0].expand_as(state.t_emb))
            state.graph = self._capture(step, state.z)
        run = state.graph.replay if state.graph is not None else step
        for k in range(steps):
            state.t_emb.copy_(t_embs[k].expand_as(state.t_emb))
            run()
            if on_step is not None:
                on_step(k + 1, steps)
        return state.z.clone()

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
                          rule.finish_reason(t, 1) is not None) for i, t in enumerate(token.tolist())]
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
            if out.logits is not None:
                on_logits(out.logits[:, 0].to(logits.device))
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
