"""Reference image understanding: KV-cached autoregressive decoding over spliced image embeddings."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from jfexport.core.layout import understanding_positions
from jfexport.core.schedulers import StopRule, decode_loop

from ..modules.janusflow import JanusFlowModel


@torch.no_grad()
def decode_tokens(
    model: JanusFlowModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] until all rows hit EOS or `max_new_tokens`.

    Finished rows keep receiving EOS (the demo's pad id is EOS). Positions follow the mask
    (left padding), as transformers' `generate` derives them.
    """
    batch = inputs_embeds.shape[0]
    mask = attention_mask.long()
    positions = understanding_positions(mask)
    hidden, past, _ = model.llm(inputs_embeds, mask, positions)
    next_pos = positions[:, -1:] + 1

    def step(token: torch.Tensor) -> torch.Tensor:
        nonlocal mask, past, next_pos
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        embeds = model.embed_tokens(token[:, None]).to(inputs_embeds.dtype)
        out, past, _ = model.llm(embeds, mask, next_pos, past)
        next_pos = next_pos + 1
        return model.logits(out[:, -1])

    yield from decode_loop(model.logits(hidden[:, -1]), step, StopRule(eos_id, max_new_tokens), temperature, top_p,
                           generators, on_logits)
