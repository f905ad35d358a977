"""The decode step of understanding, written once against a chat executor.

One step gives every row of a batch k tokens: embed each row's last token -> the LLM over the K/V
cache (the executor writes the token's K/V at the row's next column, which is its position: rows
are left-aligned) -> the logits of that position -> a finite check per row -> the token choice
(`core.schedulers`) -> the stopping rule (`stop_rows`, the device form of `StopRule`).
`run_decode_step` is that step; an executor supplies the LLM call and decides where it runs:

- `EngineChatExecutor` (here): the graph contract's engines. `llm_decode` reads the cache's rows
  as `past` and returns only the new K/V (`new.*`), which `KVCache.append` writes; one token per
  step, chosen on the host from each row's own generator (`sample_next`).
- `TorchChatExecutor` (fast_chat.py): the model called directly, K/V written in place
  (`write_slots`), k tokens per step without returning to the host, chosen on the device from
  uniforms drawn beforehand from each row's generator (`sample_next_device`), each (rows, k,
  width) shape captured once as a CUDA graph.

`ChatSlots` (chat_batch.py) holds the policy (slots, admission, prefix reuse, failures) and takes
its executor at construction. Tokens after a row has stopped are its EOS: padding that never
reaches the caller, whose job applies `StopRule` to the tokens it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch

from jfexport.core.graph_contract import NEW, kv_names
from jfexport.core.layout import image_gather_index, splice_image_embeds, understanding_positions
from jfexport.core.schedulers import TokenLogprobs, row_uniforms, sample_next_device, sample_rows, stop_rows, token_logprobs

from ..engine import Engine
from .kv_cache import COLUMN_BUCKET, KVCache

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DecodeRow:
    """What a step needs of one row."""

    token: int  # its last token: the next one fed
    length: int  # tokens its slot holds: the fed token's position and column
    temperature: float
    top_p: float
    generator: torch.Generator
    remaining: int  # tokens it may still produce
    eos: int
    finished: bool = False  # a row that stopped but keeps its place in the batch: it gets EOS
    keep_logits: bool = False  # its logits come back to the host (its caller reads them)
    logprobs: int | None = None  # its tokens' logprobs, with this many alternatives, come back (computed on the device)


@dataclass
class Decoded:
    """A step's result for its n rows."""

    tokens: list[list[int]]  # [n][k]
    first_bad: list[int]  # the step index whose logits were not finite, -1 if none
    finished: list[bool]
    logits: list[torch.Tensor | None] | None  # per row, [k,V] on the host where that row keeps them
    logprobs: list[list[TokenLogprobs] | None] | None = None  # per row, k of them where that row asks


class DecodeRows:
    """What one step reads and writes: `rows` rows (the live ones, then padding rows that start
    finished), `k` tokens each. Static buffers, so that an executor can capture the step as a CUDA
    graph and replay it after `load`."""

    def __init__(self, rows: int, k: int, device: torch.device | str, draws_ahead: bool, all_greedy: bool,
                 keep_logits: bool, vocab: int | None = None):
        def z(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.rows, self.k, self.all_greedy, self.keep_logits = rows, k, all_greedy, keep_logits
        self.token, self.position = z(rows), z(rows)
        self.temperature, self.top_p = z(rows, dtype=torch.float32), z(rows, dtype=torch.float32)
        # Device choice: each row's draws, taken from its generator before the step.
        self.uniforms = z(rows, k, dtype=torch.float32) if draws_ahead else None
        # Host choice: each row's own settings (Python floats: the engine path's exact arithmetic) and generator.
        self.samplers: list[tuple[float, float, torch.Generator]] = []
        self.limit, self.produced, self.eos = z(rows), z(rows), z(rows)
        self.finished = z(rows, dtype=torch.bool)
        self.tokens = z(rows, k)
        self.first_bad = z(rows)
        # Allocated here where the vocabulary is known (a captured step must not allocate), else at the first token.
        self.logits = z(rows, k, vocab, dtype=torch.float32) if keep_logits and vocab is not None else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._keep: list[tuple[bool, int | None]] = []

    def load(self, rows: Sequence[DecodeRow], draws: torch.Tensor | None = None) -> None:
        """Set the inputs of the next step; kept so that they can be restored after a capture.
        `draws` [n,k]: the rows' uniforms where they were taken already (else drawn here)."""
        pad = self.rows - len(rows)
        self._keep = [(r.keep_logits, r.logprobs) for r in rows]

        def column(values: list, fill, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values + [fill] * pad, dtype=dtype)

        # Padding rows decode at column 0 of free slots and are finished from the start.
        self._inputs = dict(token=column([r.token for r in rows], 0, torch.long),
                            position=column([r.length for r in rows], 0, torch.long),
                            temperature=column([r.temperature for r in rows], 0.0, torch.float32),
                            top_p=column([r.top_p for r in rows], 1.0, torch.float32),
                            limit=column([r.remaining for r in rows], 1, torch.long),
                            eos=column([r.eos for r in rows], 0, torch.long),
                            finished=column([r.finished for r in rows], True, torch.bool))
        if self.uniforms is not None:
            # Always drawn, greedy or not, so that a row's j-th token takes its generator's j-th draw.
            drawn = draws if draws is not None else row_uniforms([r.generator for r in rows], self.k)
            self._inputs["uniforms"] = torch.cat([drawn, torch.zeros(pad, self.k)])
        else:
            self.samplers = [(r.temperature, r.top_p, r.generator) for r in rows]
        self.restore()

    def restore(self) -> None:
        for name, value in self._inputs.items():
            getattr(self, name).copy_(value)
        self.produced.zero_()
        self.first_bad.fill_(-1)

    def result(self, n: int) -> Decoded:
        """The first n rows' outputs (the step's one host synchronisation)."""
        tokens = self.tokens[:n].tolist()
        logits = logprobs = None
        if self.logits is not None:
            # Only the rows that asked cross to the host, their logprobs as a few numbers: the others in
            # the batch pay no copy. The gather is a copy even on CPU: the next step overwrites the buffer.
            keep = [i for i in range(n) if self._keep[i][0]]
            kept = iter(self.logits[keep].cpu()) if keep else iter(())
            logits = [next(kept) if raw else None for raw, _ in self._keep[:n]]
            logprobs = [None if top is None else token_logprobs(self.logits[i], tokens[i], top)
                        for i, (_, top) in enumerate(self._keep[:n])]
        return Decoded(tokens, self.first_bad[:n].tolist(), self.finished[:n].tolist(), logits, logprobs)


def choose_tokens(logits: torch.Tensor, s: DecodeRows, j: int) -> torch.Tensor:
    """The j-th token [R] of every row from its logits [R,V] (`core.schedulers`): on the device from
    the rows' drawn uniforms, or on the host from their generators."""
    if s.uniforms is not None:
        return sample_next_device(logits, s.temperature, s.top_p, s.uniforms[:, j], s.all_greedy)
    # A finished or failed row's token is never used: it draws nothing (NaN cannot be sampled).
    return sample_rows(logits, s.samplers, s.finished[: len(s.samplers)] | ~torch.isfinite(logits).all(dim=-1))


def run_decode_step(forward: Forward, s: DecodeRows) -> None:
    """The decode step: k tokens for every row of `s`. `forward(token [R,1], position [R,1])` runs the
    LLM over the K/V cache, writing the fed tokens' K/V, and returns the fp32 logits [R,V]."""
    for j in range(s.k):
        logits = forward(s.token[:, None], s.position[:, None])
        bad = ~s.finished & ~torch.isfinite(logits).all(dim=-1)
        s.first_bad.copy_(torch.where(bad & (s.first_bad < 0), j, s.first_bad))
        if s.keep_logits:
            if s.logits is None:
                s.logits = logits.new_zeros(s.rows, s.k, logits.shape[-1])
            s.logits[:, j] = logits
        token = stop_rows(choose_tokens(logits, s, j), s.finished, s.produced, s.limit, s.eos)
        s.tokens[:, j] = token
        s.token.copy_(token)
        s.position.add_(1)


def first_token(logits: torch.Tensor, row: DecodeRow, draws_ahead: bool) -> int:
    """A row's first token from its prefill logits [V], chosen as its executor chooses the others
    (the same draws: a row's j-th token takes its generator's j-th)."""
    s = DecodeRows(1, 1, logits.device, draws_ahead, row.temperature == 0, keep_logits=False)
    s.load([row])
    return int(choose_tokens(logits[None], s, 0)[0])


class ChatExecutor(Protocol):
    """Where the LLM of understanding runs, for `ChatSlots`."""

    column_bucket: int  # the K/V cache's width is a multiple of this
    chunk: int  # tokens per row per decode step
    draws_ahead: bool  # tokens are chosen on the device from uniforms drawn before the step

    @property
    def device(self) -> torch.device | str: ...

    def prefill(self, batch) -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
        """(`llm_prefill` outputs, attention mask [n, width]) of a processor understanding batch."""

    def forward(self, cache: KVCache, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """The LLM over `tokens` [n,T] after the K/V of `slots`, whose lengths then grow by T; -> logits
        [n,V] of each row's last token (prefix reuse: a stored prefix's follow-up tokens)."""

    def decode(self, cache: KVCache, rows: Sequence[DecodeRow], slots: list[int], k: int,
               keep_logits: bool) -> Decoded:
        """`run_decode_step` for `rows` held by `slots`, whose lengths then grow by k."""


class EngineChatExecutor:
    """The engine path: `embed_tokens` and `llm_decode` over the graph contract, one token per step."""

    column_bucket = COLUMN_BUCKET
    chunk = 1
    draws_ahead = False

    def __init__(self, engines: Mapping[str, Engine]):
        self.engines = engines

    @property
    def device(self) -> torch.device | str:
        return getattr(self.engines.get("llm_decode"), "device", "cpu")

    def prefill(self, batch) -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
        e = self.engines
        image_embeds = e["vision_encoder"].run({"pixel_values": batch.pixel_values.flatten(0, 1)})["image_embeds"]
        text_embeds = e["embed_tokens"].run({"input_ids": batch.input_ids})["inputs_embeds"]
        device = text_embeds.device
        index = image_gather_index(batch.images_seq_mask.to(device), batch.images_emb_mask.to(device))
        embeds = splice_image_embeds(text_embeds, image_embeds.to(device), index)
        mask = batch.attention_mask.to(device)
        out = e["llm_prefill"].run({"inputs_embeds": embeds, "attention_mask": mask,
                                    "position_ids": understanding_positions(mask)})
        return out, mask

    def forward(self, cache: KVCache, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        cache.fit(max(cache.lengths[s] for s in slots) + t)
        n = len(slots)
        if slots == list(range(n)):
            past = cache.past(n)
        elif n == 1:
            past = {name: view[slots[0]: slots[0] + 1] for name, view in cache.past(cache.rows).items()}
        else:  # a retried subset: gathered (the failure path only)
            index = torch.tensor(slots, device=cache.device)
            past = {name: view.index_select(0, index) for name, view in cache.past(cache.rows).items()}
        lengths = [cache.lengths[s] for s in slots]
        device = cache.device
        mask = cache.mask(lengths, t)
        positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(t, device=device)[None, :]
        embeds = self.engines["embed_tokens"].run({"input_ids": tokens.to(device)})["inputs_embeds"]
        new = kv_names(NEW, cache.layout.layers)
        out = self.engines["llm_decode"].run({"inputs_embeds": embeds, "attention_mask": mask,
                                              "position_ids": positions, **past},
                                             outputs=cache.staging(n) if t == 1 else None, names=("logits", *new))
        cache.append(slots, out)
        return out["logits"].float()

    def decode(self, cache: KVCache, rows: Sequence[DecodeRow], slots: list[int], k: int,
               keep_logits: bool, draws: torch.Tensor | None = None) -> Decoded:
        """`draws` [n,k]: choose on the device from these uniforms, as the torch executor does (the
        steps it hands over, with the draws it took for them)."""
        s = DecodeRows(len(rows), k, cache.device, draws is not None, all(r.temperature == 0 for r in rows),
                       keep_logits)
        s.load(rows, draws)
        # Each call appends at the slots' lengths, which are the positions `s` tracks.
        run_decode_step(lambda token, position: self.forward(cache, slots, token), s)
        return s.result(len(rows))
