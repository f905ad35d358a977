"""Image understanding over engines: splice image embeddings, prefill, then one token at a time
with a preallocated K/V cache (greedy or temperature/top-p) until EOS or the token limit."""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import torch

from jfexport.reference.pipelines.layout import understanding_positions
from jfexport.reference.schedulers import choose_next

from .engine import Engine
from .errors import check_finite
from .kv_cache import KVCache


def splice_image_embeds(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, images_seq_mask: torch.Tensor, images_emb_mask: torch.Tensor
) -> torch.Tensor:
    """Overwrite the BOI + placeholder positions with the image blocks (official `prepare_inputs_embeds`)."""
    b, n = images_emb_mask.shape[:2]
    blocks = image_embeds.view(b, n, image_embeds.shape[1], image_embeds.shape[2])
    out = text_embeds.clone()
    out[images_seq_mask] = blocks[images_emb_mask].to(out.dtype)
    return out


def decode(
    engines: Mapping[str, Engine],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    images_seq_mask: torch.Tensor,
    images_emb_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token [B] of every row; finished rows keep receiving EOS."""
    batch = input_ids.shape[0]
    image_embeds = engines["vision_encoder"].run({"pixel_values": pixel_values.flatten(0, 1)})["image_embeds"]
    text_embeds = engines["embed_tokens"].run({"input_ids": input_ids})["inputs_embeds"]
    device = text_embeds.device  # where the engines put their outputs: the loop's bookkeeping follows them
    embeds = splice_image_embeds(text_embeds, image_embeds, images_seq_mask.to(device), images_emb_mask.to(device))
    mask = attention_mask.long().to(device)
    positions = understanding_positions(mask)
    out = engines["llm_prefill"].run({"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions})
    first = out["present.0.key"]
    layers = sum(1 for k in out if k.endswith(".key"))
    cache = KVCache(layers, batch, first.shape[1], first.shape[3], mask.shape[1] + max_new_tokens, first.dtype, first.device)
    cache.commit(out)
    next_pos = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = out["logits"].float()
        check_finite("llm", "logits", logits)
        token = choose_next(logits, finished, eos_id, temperature, top_p, generator, on_logits)
        yield token
        if bool(finished.all()):
            return
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        step = engines["embed_tokens"].run({"input_ids": token[:, None]})["inputs_embeds"]
        out = engines["llm_decode"].run(
            {"inputs_embeds": step, "attention_mask": mask, "position_ids": next_pos, **cache.past()},
            outputs=cache.present_buffers(mask.shape[1]),
        )
        cache.commit(out)
        next_pos = next_pos + 1
