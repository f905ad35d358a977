"""Text-to-image over engines: prompt K/V once, then the CFG Euler loop (DESIGN.md "Runtime").

Per step: `gen_encoder` on the B distinct latents (both CFG halves share z, so its outputs are
duplicated rather than recomputed), `llm_decode` over [t_emb, z_embeds] with the prompt K/V as
past (step tokens are never appended), `gen_decoder`, CFG combine, Euler update. The ODE state
stays fp32 whatever the engines' precision.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from jfexport.reference.pipelines.layout import cfg_prompt_rows, offset_positions
from jfexport.reference.schedulers import euler_schedule

from .engine import Engine
from .errors import check_finite


def sample(
    engines: Mapping[str, Engine],
    cond_ids: torch.Tensor,
    cond_mask: torch.Tensor,
    z0: torch.Tensor,
    steps: int,
    cfg_weight: float,
    pad_id: int,
    grid: int,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    batch = z0.shape[0]
    ids, prompt_mask, pad = cfg_prompt_rows(cond_ids, cond_mask, pad_id)
    prompt_len = ids.shape[1]
    tail = 1 + grid * grid
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(2 * batch, tail)], dim=1)
    positions = offset_positions(pad, prompt_len + tail)
    embeds = engines["embed_tokens"].run({"input_ids": ids})["inputs_embeds"]
    prefill = engines["llm_prefill"].run(
        {"inputs_embeds": embeds, "attention_mask": prompt_mask, "position_ids": positions[:, :prompt_len]}
    )
    past = {k.replace("present.", "past.", 1): v for k, v in prefill.items() if k.startswith("present.")}
    # The loop runs where the engines put their outputs (CPU for ONNX Runtime, the GPU otherwise).
    device = embeds.device
    step_mask, step_positions = mask.to(device), positions[:, prompt_len:].contiguous().to(device)
    t_table, dt = euler_schedule(steps, torch.float32)
    t_table = t_table.to(device)
    z = z0.float().to(device)
    for k in range(steps):
        enc = engines["gen_encoder"].run({"latents": z, "timesteps": t_table[k].repeat(batch)})
        t_emb = enc["t_embeds"].repeat(2, 1)
        step_embeds = torch.cat([t_emb[:, None, :], enc["z_embeds"].repeat(2, 1, 1)], dim=1)
        hidden = engines["llm_decode"].run(
            {"inputs_embeds": step_embeds, "attention_mask": step_mask, "position_ids": step_positions, **past}
        )["hidden_states"]
        v_raw = engines["gen_decoder"].run(
            {"hidden_states": hidden[:, 1:], "skip": enc["skip"].repeat(2, 1, 1, 1), "t_embeds": t_emb}
        )["velocity"].float()
        check_finite("gen_decoder", "velocity", v_raw, step=k)
        v = cfg_weight * v_raw[:batch] - (cfg_weight - 1.0) * v_raw[batch:]
        z = z + dt * v
        if on_step is not None:
            on_step(k + 1, steps)
    return z
