"""Reference text-to-image sampling: the official CFG rectified-flow Euler loop.

Two LLM schedules compute the same function: `cached` runs the prompt once and reuses its K/V
for every step (the step tokens are never appended), `recompute` re-runs the whole sequence each
step through transformers' own LlamaModel forward, exactly as the official demo ends up doing (its
cache is dropped, JANUSFLOW.md 4.5) — which also cross-checks our explicit-input Llama forward.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from jfexport.core.layout import cfg_prompt_rows, offset_positions
from jfexport.core.schedulers import FlowEulerCFGScheduler

from ..modules.janusflow import JanusFlowModel

Observer = Callable[[str, torch.Tensor], None]
Schedule = Literal["cached", "recompute"]


@torch.no_grad()
def sample_latents(
    model: JanusFlowModel,
    cond_ids: torch.Tensor,
    cond_mask: torch.Tensor,
    z0: torch.Tensor,
    steps: int,
    cfg_weight: float,
    pad_id: int,
    schedule: Schedule = "cached",
    observe: Observer | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run the sampler from noise `z0` [B,C,h,w] and return the final latent.

    cond_ids/cond_mask [B,L]: left-padded prompts ending with the generation tag, which is
    dropped (its slot is taken by the time embedding). Arithmetic runs in z0's dtype (bf16 z0 on
    a bf16 model reproduces the official numerics). `observe(name, tensor)` receives every
    intermediate the golden files record.
    """
    obs = observe or (lambda name, t: None)
    batch = z0.shape[0]
    dtype = z0.dtype
    ids, prompt_mask, pad = cfg_prompt_rows(cond_ids, cond_mask, pad_id)
    prompt_len = ids.shape[1]
    grid = model.config.image_grid(z0.shape[-1])
    tail = 1 + grid * grid
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(2 * batch, tail)], dim=1)
    positions = offset_positions(pad, prompt_len + tail)
    prompt_embeds = model.embed_tokens(ids).to(dtype)
    past = None
    if schedule == "cached":
        _, past, _ = model.llm(prompt_embeds, prompt_mask, positions[:, :prompt_len])
    elif schedule != "recompute":
        raise ValueError(f"unknown schedule {schedule!r}")
    scheduler = FlowEulerCFGScheduler(steps, cfg_weight, dtype)
    t_table = scheduler.timesteps.to(z0.device)
    z = z0
    for k in range(steps):
        t = t_table[k].repeat(2 * batch)
        obs(f"step{k}.t", t)
        # Both CFG halves see the same z, so the encoder runs once on B rows and is duplicated.
        z_emb, t_emb, skip = model.gen_encode(z, t[:batch])
        z_emb, t_emb, skip = z_emb.repeat(2, 1, 1), t_emb.repeat(2, 1), skip.repeat(2, 1, 1, 1)
        obs(f"step{k}.t_emb", t_emb)
        obs(f"step{k}.enc_out", skip)
        obs(f"step{k}.z_emb_aligned", z_emb)
        step_embeds = torch.cat([t_emb[:, None, :], z_emb], dim=1)
        if schedule == "cached":
            hidden, _, _ = model.llm(step_embeds, mask, positions[:, prompt_len:], past)
        else:
            hidden = model.language_model.model(
                inputs_embeds=torch.cat([prompt_embeds, step_embeds], dim=1), attention_mask=mask, position_ids=positions
            ).last_hidden_state[:, prompt_len:]
        obs(f"step{k}.last_hidden", hidden)
        v_raw = model.gen_decode(hidden[:, 1:], skip, t_emb)
        obs(f"step{k}.v_raw", v_raw)
        z, v = scheduler.step(z, v_raw[:batch], v_raw[batch:])
        obs(f"step{k}.v", v)
        obs(f"step{k}.z", z)
        if on_step is not None:
            on_step(k + 1, steps)
    return z


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of raw latents (divided by the scaling factor here) -> images in [-1, 1]."""
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
