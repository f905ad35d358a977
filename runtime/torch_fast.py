"""The fast PyTorch path for GPUs: bf16, fused attention, prompt K/V computed once, per-step
constants precomputed, and one Euler step captured as a CUDA graph and replayed (captured once per prompt-length
bucket, then reused by every request of that shape).

What depends only on the step index is hoisted out of the loop: the time embeddings of all
steps are computed in one batched call. The step itself reads and writes static buffers (z and
the step's time embedding), which is what CUDA-graph capture requires; replaying the graph
removes the per-kernel launch overhead that dominates small-batch steps.
"""

from __future__ import annotations

from typing import Callable

import torch

from jfexport.reference.modules.janusflow import JanusFlowModel
from jfexport.reference.pipelines.layout import cfg_prompt_rows, offset_positions
from jfexport.reference.pipelines.timesteps import euler_schedule


class _StepState:
    """The static buffers one Euler step reads and writes, and (once captured) its CUDA graph."""

    def __init__(self, z: torch.Tensor, t_emb: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.z, self.t_emb, self.mask, self.positions, self.past = z, t_emb, mask, positions, past
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, z: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.z.copy_(z)
        self.mask.copy_(mask)
        self.positions.copy_(positions)
        for (k, v), (k_new, v_new) in zip(self.past, past):
            k.copy_(k_new)
            v.copy_(v_new)


class FastSampler:
    def __init__(self, model: JanusFlowModel, grid: int, cuda_graphs: bool = False):
        self.model = model
        self.grid = grid
        self.cuda_graphs = cuda_graphs
        # One captured step per (batch, prompt length, cfg, dt): requests of a prompt-length bucket
        # replay the same graph after copying their prompt K/V and noise into its buffers.
        self._captured: dict[tuple, _StepState] = {}

    @torch.inference_mode()
    def sample(self, cond_ids: torch.Tensor, cond_mask: torch.Tensor, z0: torch.Tensor, steps: int, cfg_weight: float,
               pad_id: int, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        model, device = self.model, z0.device
        dtype = next(model.parameters()).dtype
        batch = z0.shape[0]
        ids, prompt_mask, pad = cfg_prompt_rows(cond_ids.to(device), cond_mask.to(device), pad_id)
        prompt_len = ids.shape[1]
        tail = 1 + self.grid**2
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(2 * batch, tail)], dim=1)
        positions = offset_positions(pad, prompt_len + tail)
        _, past, _ = model.llm(model.embed_tokens(ids), prompt_mask, positions[:, :prompt_len])
        step_positions = positions[:, prompt_len:].contiguous()
        t_table, dt = euler_schedule(steps, torch.float32)
        t_embs = model.vision_gen_enc_model.time_embedding(t_table.to(device), dtype)  # [steps, D]
        dt = float(dt)

        graphed = self.cuda_graphs and device.type == "cuda"
        key = (batch, prompt_len, cfg_weight, dt)
        state = self._captured.get(key) if graphed else None
        if state is None:
            state = _StepState(z0.float().clone(), torch.empty(batch, t_embs.shape[1], dtype=dtype, device=device), mask,
                               step_positions, [(k.clone(), v.clone()) for k, v in past])
        else:
            state.load(z0.float(), mask, step_positions, past)
        z, t_emb = state.z, state.t_emb

        def step() -> None:
            x_emb = model.vision_gen_enc_model.features(z.to(dtype), t_emb)
            t2 = t_emb.repeat(2, 1)
            step_embeds = torch.cat([t2[:, None, :], model.align_latent_tokens(x_emb).repeat(2, 1, 1)], dim=1)
            hidden, _, _ = model.llm(step_embeds, state.mask, state.positions, state.past)
            v_raw = model.gen_decode(hidden[:, 1:], x_emb.repeat(2, 1, 1, 1), t2).float()
            z.add_(dt * (cfg_weight * v_raw[:batch] - (cfg_weight - 1.0) * v_raw[batch:]))

        if graphed and state.graph is None:
            state.graph = self._capture(step, z, t_emb, t_embs[0])
            self._captured[key] = state
        run = state.graph.replay if state.graph is not None else step
        for k in range(steps):
            t_emb.copy_(t_embs[k].expand_as(t_emb))
            run()
            if on_step is not None:
                on_step(k + 1, steps)
        return z.clone()

    @staticmethod
    def _capture(step: Callable[[], None], z: torch.Tensor, t_emb: torch.Tensor, t_first: torch.Tensor) -> torch.cuda.CUDAGraph:
        """Capture `step` on static buffers; warm-up runs are undone so the capture has no side effect."""
        saved = z.clone()
        t_emb.copy_(t_first.expand_as(t_emb))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and the allocator outside the capture
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        z.copy_(saved)
        return graph
