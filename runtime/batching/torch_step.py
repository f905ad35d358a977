"""The fast PyTorch step of the scheduler: one CFG Euler step calling the model directly over static
buffers, and the CUDA-graph capture helpers the fast executors share.

Replaying a captured graph removes the per-kernel launch overhead that dominates small batches;
a step whose kernels cannot be captured runs eagerly instead (`capture_or_none`).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from jfexport.core.schedulers import cfg_velocity, euler_step
from jfexport.reference.modules.janusflow import JanusFlowModel

log = logging.getLogger(__name__)


def capture_graph(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """`step` captured as a CUDA graph over the static buffers it reads and writes. It runs twice
    first on a side stream (kernel selection, allocator warm-up), as capture requires; callers
    undo or overwrite what those runs wrote."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def capture_or_none(step: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
    """`capture_graph(step)`, or None (logged) where a kernel of the step cannot be captured: the
    caller then runs the step eagerly, so an op that breaks capture costs speed, not requests."""
    try:
        return capture_graph(step)
    except RuntimeError:
        log.warning("CUDA-graph capture failed; running eagerly", exc_info=True)
        return None


# Static K/V lengths are rounded up to this so that requests of similar length share a graph.
DECODE_BUCKET = 256


def gen_encoder(model: JanusFlowModel, z: torch.Tensor, t_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dtype = t_emb.dtype
    x_emb = model.vision_gen_enc_model.features(z.to(dtype), t_emb)
    t2 = t_emb.repeat(2, 1)
    return x_emb, t2, torch.cat([t2[:, None, :], model.align_latent_tokens(x_emb).repeat(2, 1, 1)], dim=1)


def gen_decoder(model: JanusFlowModel, hidden: torch.Tensor, x_emb: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    return model.gen_decode(hidden[:, 1:], x_emb.repeat(2, 1, 1, 1), t2).float()


def time_embedding(model: JanusFlowModel, s) -> torch.Tensor:
    """The step's time embedding: precomputed (`s.t_emb`) or from per-row timesteps (`s.timesteps`),
    rounded to the model's dtype first as the engine path's gen_encoder input is (and the official
    loop's bf16 t)."""
    if s.timesteps is None:
        return s.t_emb
    dtype = next(model.parameters()).dtype
    return model.vision_gen_enc_model.time_embedding(s.timesteps.to(dtype), dtype)


def cfg_euler_step(model: JanusFlowModel, s) -> torch.Tensor:
    """The next latents of one CFG Euler step over static buffers `s` (z [B,...] fp32, t_emb or
    timesteps, the CFG pairs' mask, positions and prompt K/V [2B,...], cfg and dt [B,1,1,1]): the
    engine path's gen_encoder, llm_decode, gen_decoder and CFG Euler update, as one function so that
    it can be captured as a CUDA graph or compiled whole."""
    x_emb, t2, embeds = gen_encoder(model, s.z, time_embedding(model, s))
    hidden = model.llm(embeds, s.mask, s.positions, s.past)[0]
    v_raw = gen_decoder(model, hidden, x_emb, t2)
    batch = s.z.shape[0]
    return euler_step(s.z, cfg_velocity(v_raw[:batch], v_raw[batch:], s.cfg), s.dt)
