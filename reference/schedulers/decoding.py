"""Next-token choice and the stopping rule of understanding (the official `generate` call, JANUSFLOW.md 5).

Greedy when temperature == 0 (the demo's `do_sample = temperature != 0`), else temperature +
top-p. Each row draws from its own generator, so a row's tokens never depend on the rows it is
batched with; row i of a call seeded `seed` uses seed + i (one question alone with seed s is
row 0 of any call seeded s). A row stops after EOS or after `max_new_tokens` tokens, and no model
step is run for a token that will not be used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch

FinishReason = Literal["stop", "length"]


def row_generators(seed: int, rows: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(rows)]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token [B] of `logits` [B,V]; sampled rows share `generator` (pass one row for independence)."""
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
                generators: Sequence[torch.Generator] | None,
                on_logits: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The next token [B] of every row; rows already finished get EOS, and `finished` is updated in place."""
    if on_logits is not None:
        on_logits(logits)
    if temperature == 0:
        token = logits.argmax(dim=-1)
    else:
        gens = generators if generators is not None else row_generators(0, logits.shape[0])
        token = torch.cat([sample_next(logits[i:i + 1], temperature, top_p, g) for i, g in enumerate(gens)])
    token = torch.where(finished, torch.full_like(token, eos_id), token)
    finished |= token == eos_id
    return token


@dataclass(frozen=True)
class StopRule:
    eos_id: int
    max_new_tokens: int

    def finish_reason(self, token: int, produced: int) -> FinishReason | None:
        """Why a row ends after emitting `token` as its `produced`-th token, or None if it goes on."""
        if token == self.eos_id:
            return "stop"
        if produced >= self.max_new_tokens:
            return "length"
        return None


def decode_loop(logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], rule: StopRule, temperature: float,
                top_p: float, generators: Sequence[torch.Generator] | None,
                on_logits: Callable[[torch.Tensor], None] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token [B] of every row until every row has stopped; `step(token)` -> next logits.

    Finished rows keep receiving EOS (the demo's pad id is EOS) while others go on.
    """
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for produced in range(1, rule.max_new_tokens + 1):
        token = choose_next(logits, finished, rule.eos_id, temperature, top_p, generators, on_logits)
        yield token
        if bool(finished.all()) or produced == rule.max_new_tokens:
            return
        logits = step(token)


def answers_from_stream(stream: Iterator[torch.Tensor], rows: int, tokenizer) -> list[str]:
    """Collect each row's tokens up to its first EOS and decode them."""
    ids: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for token in stream:
        for i, t in enumerate(token.tolist()):
            done[i] = done[i] or t == tokenizer.eos_id
            if not done[i]:
                ids[i].append(t)
    return [tokenizer.decode(row) for row in ids]
