"""The fast torch path of understanding under the scheduler: k tokens per row per host round trip.

`ChatSlots` decodes one token per iteration through the engines and chooses it on the host. Here
prefill runs over static buffers (`fast_prefill`), and an iteration decodes a chunk of k tokens
for every active row without returning to the host: `model.llm(..., write_slots=...)` writes
each token's K/V in place into the `ChatSlots` K/V cache (row r at its own next column, which is
its position: rows are left-aligned), attention reads the cache's columns [0, width) (causality
hides each row's columns past its position, so the mask is all ones), and the next token is
chosen on the device (`sample_next_device`
with uniforms drawn beforehand from each row's own generator, then `stop_rows`). Only the
chunk's tokens [rows, k] come back, and the host pushes them through the job (whose `StopRule`
decides why a row ends); tokens after a row's EOS are padding and never reach the caller. A
row's j-th token always uses its generator's j-th draw, so its tokens do not depend on chunking
or companions.

Shapes are fixed per (row bucket, k, hi, logits kept, all rows greedy): rows are padded to a power of two (the
padding rows decode into free slots) and hi, the cache's width, is a multiple of `DECODE_BUCKET`, so on CUDA each
chunk is captured once as a CUDA graph and replayed (bounded LRU). If a chunk raises, that
iteration falls back to the engine path, which retries job by job to find the request at fault.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch

from jfexport.core.schedulers import row_uniforms, sample_next_device, stop_rows

from ..backends.torch_backend import exact_fp32
from ..engine import Engine
from ..errors import NonFiniteOutput
from ..lru import LRU
from .torch_step import DECODE_BUCKET, capture_or_none
from .chat_batch import ChatSlots, Failure, _Active
from .kv_cache import KVLayout
from .fast_prefill import PrefillGraphs
from .jobs import ChatJob

log = logging.getLogger(__name__)

# Tokens per row per host round trip: the "k steps per synchronisation".
DEFAULT_CHUNK = 8


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _Chunk:
    """Static buffers of one chunk: R rows, k tokens, attention over store columns [0, hi)."""

    def __init__(self, rows: int, k: int, hi: int, vocab: int, keep_logits: bool, all_greedy: bool,
                 device: torch.device):
        def z(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.rows, self.k, self.hi, self.all_greedy = rows, k, hi, all_greedy
        self.token, self.position = z(rows), z(rows)
        self.mask = torch.ones((rows, hi), dtype=torch.long, device=device)
        self.temperature, self.top_p = z(rows, dtype=torch.float32), z(rows, dtype=torch.float32)
        self.uniforms = z(rows, k, dtype=torch.float32)
        self.limit, self.produced, self.eos = z(rows), z(rows), z(rows)
        self.finished = z(rows, dtype=torch.bool)
        self.tokens = z(rows, k)
        self.first_bad = z(rows)  # the step whose logits were not finite, -1 if none
        self.logits = z(rows, k, vocab, dtype=torch.float32) if keep_logits else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._inputs: dict[str, torch.Tensor] = {}

    def load(self, **values: torch.Tensor) -> None:
        """Set the inputs of the next run; kept so that they can be restored after a capture."""
        self._inputs = values
        self.restore()

    def restore(self) -> None:
        for name, value in self._inputs.items():
            getattr(self, name).copy_(value)
        self.produced.zero_()
        self.first_bad.fill_(-1)


class FastChatSlots(ChatSlots):
    column_bucket = DECODE_BUCKET  # each cache width is a shape captured once

    def __init__(self, engines: Mapping[str, Engine], processor, max_rows: int, max_len: int, kv_budget_bytes: int,
                 observe: Callable[[str, int], None], model, cuda_graphs: bool, chunk: int = DEFAULT_CHUNK,
                 kv_layout: KVLayout | None = None, prefix_cache_bytes: int = 0):
        super().__init__(engines, processor, max_rows, max_len, kv_budget_bytes, observe, kv_layout, prefix_cache_bytes)
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.chunk = chunk
        self._chunks: LRU[tuple[int, int, int, bool, bool], _Chunk] = LRU()
        self.prefills = PrefillGraphs(model, processor.tokenizer.pad_id, max_len, cuda_graphs)

    def _prefill_outputs(self, batch) -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
        try:
            with torch.inference_mode(), exact_fp32(next(self.model.parameters()).dtype):
                return self.prefills.run(batch)
        except Exception:  # noqa: BLE001 - the engine path raises again if the request is at fault
            log.warning("fast prefill failed; this prefill runs on the engine path", exc_info=True)
            return super()._prefill_outputs(batch)

    def _choose(self, active: _Active, logits: torch.Tensor) -> int:
        """The device sampler for the first token too, so that a row's j-th token takes its j-th draw."""
        job, dev = active.job, logits.device
        u = row_uniforms([active.row.generator], 1)[:, 0].to(dev)
        return int(sample_next_device(logits[None], torch.tensor([job.temperature], device=dev),
                                      torch.tensor([job.top_p], device=dev), u)[0])

    def step(self) -> list[Failure]:
        cache = self.cache
        longest = max(cache.lengths)
        k = min(self.chunk, max(a.job.rule.max_new_tokens - a.produced for a in self.rows), self.max_len - longest)
        cache.fit(longest + k)
        rows = list(self.rows)
        try:
            tokens, first_bad, logits = self._decode(rows, k)
        except Exception:  # noqa: BLE001 - the engine path below finds the request at fault
            log.warning("fast chat chunk failed; this iteration runs on the engine path", exc_info=True)
            return super().step()
        for i in range(len(rows)):
            cache.lengths[i] += k
        failures: dict[ChatJob, BaseException] = {}
        for i, active in enumerate(rows):
            if first_bad[i] >= 0:
                failures.setdefault(active.job, NonFiniteOutput(
                    f"llm_decode: output 'logits' has NaN/Inf values at token {active.produced + first_bad[i] + 1} "
                    "of this request"))
        for job in failures:
            self._zero(job)
        for i, active in enumerate(rows):
            if active.job not in failures:
                self._push(active, tokens[i], None if logits is None else logits[i])
        return list(failures.items())

    def _push(self, active: _Active, tokens: list[int], logits: torch.Tensor | None) -> None:
        """The row's tokens of this chunk up to the one that ends it; then it leaves its slot."""
        job = active.job
        for j, token in enumerate(tokens):
            active.produced += 1
            reason = job.push(active.row, token, logits[j] if job.keep_logits else None, active.produced)
            if reason is not None:
                # Its columns past the end token hold the chunk's padding tokens: only `count` are kept.
                self.cache.lengths[self.rows.index(active)] -= len(tokens) - 1 - j
                self._leave(active)
                return

    def _decode(self, rows: list[_Active], k: int) -> tuple[list[list[int]], list[int], torch.Tensor | None]:
        """k tokens of every row: (tokens [n][k], first non-finite step per row or -1, logits [n,k,V] or None)."""
        n = len(rows)
        cache = self.cache
        dev = cache.device
        width = _pow2(n) if _pow2(n) <= self.slots else self.slots
        hi = cache.width
        keep = any(a.job.keep_logits for a in rows)
        greedy = all(a.job.temperature == 0 for a in rows)
        key = (width, k, hi, keep, greedy)
        state = self._chunks.get(key)
        if state is None:
            vocab = self.model.language_model.lm_head.out_features
            state = _Chunk(width, k, hi, vocab, keep, greedy, dev)
            self._chunks.put(key, state)
        pad = width - n

        def padded(values: list, fill, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values + [fill] * pad, dtype=dtype)

        # Padding rows decode at column 0 of free slots and are finished from the start.
        state.load(token=padded([a.last_token for a in rows], 0, torch.long),
                   position=padded(cache.lengths[:n], 0, torch.long),
                   temperature=padded([a.job.temperature for a in rows], 0.0, torch.float32),
                   top_p=padded([a.job.top_p for a in rows], 1.0, torch.float32),
                   uniforms=torch.cat([row_uniforms([a.row.generator for a in rows], k), torch.zeros(pad, k)]),
                   limit=padded([a.job.rule.max_new_tokens - a.produced for a in rows], 1, torch.long),
                   eos=padded([a.job.rule.eos_id for a in rows], 0, torch.long),
                   finished=padded([False] * n, True, torch.bool))
        with torch.inference_mode(), exact_fp32(cache.layout.dtype):
            if self.cuda_graphs and dev.type == "cuda" and state.graph is None:
                # The warm-up runs advance the buffers and write K/V at columns >= each row's length, which the
                # replay (or the eager run) rewrites from the restored inputs.
                state.graph = capture_or_none(lambda: self._run(state))
                self.cuda_graphs = state.graph is not None
                state.restore()
            if state.graph is not None:
                state.graph.replay()
            else:
                self._run(state)
        self.observe("chat", n)
        tokens = state.tokens[:n].tolist()  # the chunk's one host synchronisation
        # A copy even on CPU (where .cpu() returns the buffer itself): the next chunk overwrites it.
        logits = state.logits[:n].to("cpu", copy=True) if keep else None
        return tokens, state.first_bad[:n].tolist(), logits

    def _run(self, s: _Chunk) -> None:
        model = self.model
        past = self.cache.layers(s.rows)
        for j in range(s.k):
            embeds = model.embed_tokens(s.token[:, None])
            hidden, _, _ = model.llm(embeds, s.mask, s.position[:, None], past, write_slots=s.position[:, None])
            logits = model.logits(hidden[:, -1]).float()
            bad = ~s.finished & ~torch.isfinite(logits).all(dim=-1)
            s.first_bad.copy_(torch.where(bad & (s.first_bad < 0), j, s.first_bad))
            if s.logits is not None:
                s.logits[:, j] = logits
            token = stop_rows(sample_next_device(logits, s.temperature, s.top_p, s.uniforms[:, j], s.all_greedy),
                              s.finished, s.produced, s.limit, s.eos)
            s.tokens[:, j] = token
            s.token.copy_(token)
            s.position.add_(1)
