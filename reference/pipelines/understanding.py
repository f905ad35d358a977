"""Reference image understanding: KV-cached autoregressive decoding over spliced image embeddings."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..modules.janusflow import JanusFlowModel
from ..processor import JanusTokenizer
from .layout import understanding_positions


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy when temperature == 0 (the demo's `do_sample = temperature != 0`), else temperature + top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    # Draw on the generator's device so a seed gives the same tokens whatever device the logits are on.
    draw_on = generator.device if generator is not None else sorted_probs.device
    choice = torch.multinomial(sorted_probs.to(draw_on), 1, generator=generator).to(order.device)
    return order.gather(-1, choice).squeeze(-1)


def choose_next(logits: torch.Tensor, finished: torch.Tensor, eos_id: int, temperature: float, top_p: float,
                generator: torch.Generator | None, on_logits: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The next token [B] of every row; rows already finished get EOS, and `finished` is updated in place."""
    if on_logits is not None:
        on_logits(logits)
    token = sample_next(logits, temperature, top_p, generator)
    token = torch.where(finished, torch.full_like(token, eos_id), token)
    finished |= token == eos_id
    return token


@torch.no_grad()
def decode_tokens(
    model: JanusFlowModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
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
    finished = torch.zeros(batch, dtype=torch.bool, device=inputs_embeds.device)
    logits = model.logits(hidden[:, -1])
    for _ in range(max_new_tokens):
        token = choose_next(logits, finished, eos_id, temperature, top_p, generator, on_logits)
        yield token
        if bool(finished.all()):
            return
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        hidden, past, _ = model.llm(model.embed_tokens(token[:, None]).to(inputs_embeds.dtype), mask, next_pos, past)
        next_pos = next_pos + 1
        logits = model.logits(hidden[:, -1])


def answers_from_stream(stream: Iterator[torch.Tensor], rows: int, tokenizer: JanusTokenizer) -> list[str]:
    """Collect each row's tokens up to its first EOS and decode them."""
    ids: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for token in stream:
        for i, t in enumerate(token.tolist()):
            done[i] = done[i] or t == tokenizer.eos_id
            if not done[i]:
                ids[i].append(t)
    return [tokenizer.decode(row) for row in ids]
