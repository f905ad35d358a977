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


def sample_rows(logits: torch.Tensor, settings: Sequence[tuple[float, float, torch.Generator]],
                skip: torch.Tensor | None = None) -> torch.Tensor:
    """The next token [B] of `logits` [B,V] for rows with their own (temperature, top_p, generator):
    `sample_next` row by row on the host. Greedy rows, and rows in `skip` (stopped, or with logits
    that cannot be sampled), take the argmax and draw nothing."""
    token = logits.argmax(dim=-1)
    for i, (temperature, top_p, generator) in enumerate(settings):
        if temperature > 0 and (skip is None or not bool(skip[i])):
            token[i] = sample_next(logits[i: i + 1], temperature, top_p, generator)[0]
    return token


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
        token = sample_rows(logits, [(temperature, top_p, g) for g in gens])
    token = torch.where(finished, torch.full_like(token, eos_id), token)
    finished |= token == eos_id
    return token


@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's log-probability and the `top` most likely tokens at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprobs]:
    """Log-softmax of the served logits [T,V] in fp32: the model's distribution, before the
    temperature scaling and top-p filtering that only decide the draw. Computed where the logits
    are (on the device, only T x (1 + top) numbers come back)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(list(tokens), device=logp.device)[:, None])[:, 0].tolist()
    values, ids = logp.topk(top, dim=-1)
    return [TokenLogprobs(t, c, tuple(zip(i, v))) for t, c, i, v in zip(tokens, chosen, ids.tolist(), values.tolist())]


def row_uniforms(generators: Sequence[torch.Generator], count: int) -> torch.Tensor:
    """[B, count] fp32 uniforms in [0, 1): row i takes the next `count` draws of `generators[i]`.

    What a device-side sampler consumes instead of drawing itself: a row's tokens then depend
    only on its own generator and on how many tokens it has drawn for, not on chunking or batching.
    """
    return torch.stack([torch.rand(count, generator=g, dtype=torch.float64, device=g.device) for g in generators]).float()


def sample_next_device(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                       uniform: torch.Tensor, all_greedy: bool = False) -> torch.Tensor:
    """`sample_next` for a batch with per-row settings, branch-free on the logits' device.

    logits [B,V]; temperature, top_p, uniform [B]. Rows with temperature 0 take the argmax; the
    others draw from the same top-p distribution as `sample_next` by inverting its CDF at
    `uniform` (so no generator runs on the device and the call can be captured in a CUDA graph).
    `all_greedy` (the caller knows every temperature is 0) skips the vocabulary sort.
    """
    greedy = logits.argmax(dim=-1)
    if all_greedy:
        return greedy
    sampled = temperature > 0
    scale = torch.where(sampled, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits.float() / scale[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p[:, None]
    kept = sorted_probs.masked_fill(drop, 0.0)
    cdf = kept.cumsum(dim=-1)
    # The first sorted index whose cumulative mass exceeds u * total; clamped to the kept prefix
    # because u * total can round up to total in fp32.
    index = (cdf <= uniform[:, None] * cdf[:, -1:]).sum(dim=-1)
    index = torch.minimum(index, (~drop).sum(dim=-1) - 1)
    drawn = order.gather(-1, index[:, None]).squeeze(-1)
    return torch.where(sampled, drawn, greedy)


def stop_rows(token: torch.Tensor, finished: torch.Tensor, produced: torch.Tensor, limit: torch.Tensor,
              eos_id: int | torch.Tensor) -> torch.Tensor:
    """`StopRule` on the device for a batch with per-row limits (and EOS ids, int or [B]): rows
    already finished get EOS; `produced` counts the tokens of unfinished rows and `finished` is
    updated, both in place."""
    eos = eos_id if isinstance(eos_id, torch.Tensor) else torch.full_like(token, eos_id)
    token = torch.where(finished, eos, token)
    produced += (~finished).long()
    finished |= (token == eos) | (produced >= limit)
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
