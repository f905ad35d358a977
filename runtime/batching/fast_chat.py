"""The torch executor of understanding: the model called directly, k tokens per row per host round trip.

Prefill runs over static buffers (`fast_prefill`); a decode step (`decode_step.run_decode_step`)
gives every active row a chunk of k tokens without returning to the host:
`model.llm(..., write_slots=...)` writes each token's K/V in place into the `KVCache` (row r at
its own next column, which is its position: rows are left-aligned), attention reads the cache's
columns [0, width) (causality hides each row's columns past its position, so the mask is all
ones), and the next token is chosen on the device from uniforms drawn beforehand from each row's
own generator. Only the chunk's tokens [rows, k] come back. A row's j-th token always uses its
generator's j-th draw, so its tokens do not depend on chunking or companions.

Shapes are fixed per (row bucket, k, width, logits kept, all rows greedy): rows are padded to a
power of two (the padding rows decode into free slots) and the width is a multiple of
`DECODE_BUCKET`, so on CUDA each chunk is captured once as a CUDA graph and replayed (bounded
LRU). If a chunk raises, that step runs on the engine path (`fallback`), with the same draws, and
a failing batch is retried job by job to find the request at fault.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch

from jfexport.core.schedulers import row_uniforms

from ..backends.torch_backend import exact_fp32
from ..lru import LRU
from .decode_step import Decoded, DecodeRow, DecodeRows, EngineChatExecutor, run_decode_step
from .fast_prefill import PrefillGraphs
from .kv_cache import KVCache
from .torch_step import DECODE_BUCKET, capture_or_none

log = logging.getLogger(__name__)

# Tokens per row per host round trip: the "k steps per synchronisation".
DEFAULT_CHUNK = 8


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class TorchChatExecutor:
    column_bucket = DECODE_BUCKET  # each cache width is a shape captured once
    draws_ahead = True

    def __init__(self, model, cuda_graphs: bool, chunk: int = DEFAULT_CHUNK, prefills: PrefillGraphs | None = None,
                 fallback: EngineChatExecutor | None = None):
        """`prefills`: the static prefill (a decoder fed from outside, as the benchmark's, needs none);
        `fallback`: the engine path for what the model call cannot run (prefix reuse's many-token
        forward, and a step or prefill that raised)."""
        self.model, self.cuda_graphs, self.chunk = model, cuda_graphs, chunk
        self.prefills, self.fallback = prefills, fallback
        # Keyed by the cache's memory too: a captured chunk reads the buffers it was captured over.
        self._chunks: LRU[tuple[int, int, int, int, bool, bool], tuple[DecodeRows, torch.Tensor]] = LRU()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prefill(self, batch) -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
        if self.prefills is None:
            return self._engines().prefill(batch)
        try:
            with torch.inference_mode(), exact_fp32(next(self.model.parameters()).dtype):
                return self.prefills.run(batch)
        except Exception:  # noqa: BLE001 - the engine path raises again if the request is at fault
            if self.fallback is None:
                raise
            log.warning("fast prefill failed; this prefill runs on the engine path", exc_info=True)
            return self.fallback.prefill(batch)

    def forward(self, cache: KVCache, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        return self._engines().forward(cache, slots, tokens)

    def decode(self, cache: KVCache, rows: Sequence[DecodeRow], slots: list[int], k: int,
               keep_logits: bool) -> Decoded:
        # Drawn once: a step handed to the engine path takes the same draws.
        draws = row_uniforms([r.generator for r in rows], k)
        if slots == list(range(cache.rows)):  # a chunk serves the dense batch; a retried subset takes the engines
            try:
                decoded = self._chunk(cache, rows, k, keep_logits, draws)
            except Exception:  # noqa: BLE001 - the engine path below finds the request at fault
                if self.fallback is None:
                    raise
                log.warning("fast chat chunk failed; this step runs on the engine path", exc_info=True)
            else:
                for s in slots:
                    cache.lengths[s] += k
                return decoded
        return self._engines().decode(cache, rows, slots, k, keep_logits, draws)

    def _engines(self) -> EngineChatExecutor:
        if self.fallback is None:
            raise RuntimeError("this torch chat executor has no engines to fall back on")
        return self.fallback

    def _chunk(self, cache: KVCache, rows: Sequence[DecodeRow], k: int, keep_logits: bool,
               draws: torch.Tensor) -> Decoded:
        n = len(rows)
        width = _pow2(n) if _pow2(n) <= cache.slots else cache.slots
        greedy = all(r.temperature == 0 for r in rows)
        key = (cache.buffers[0][0].data_ptr(), width, k, cache.width, keep_logits, greedy)
        held = self._chunks.get(key)
        if held is None:
            vocab = self.model.language_model.lm_head.out_features
            held = (DecodeRows(width, k, cache.device, True, greedy, keep_logits, vocab),
                    torch.ones((width, cache.width), dtype=torch.long, device=cache.device))
            self._chunks.put(key, held)
        state, mask = held
        state.load(rows, draws)
        model = self.model
        past = cache.layers(width)

        def forward(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            embeds = model.embed_tokens(token)
            hidden, _, _ = model.llm(embeds, mask, position, past, write_slots=position)
            return model.logits(hidden[:, -1]).float()

        def run() -> None:
            run_decode_step(forward, state)

        with torch.inference_mode(), exact_fp32(cache.layout.dtype):
            if self.cuda_graphs and cache.device.type == "cuda" and state.graph is None:
                # The warm-up runs advance the buffers and write K/V at columns >= each row's length, which the
                # replay (or the eager run) rewrites from the restored inputs.
                state.graph = capture_or_none(run)
                self.cuda_graphs = state.graph is not None
                state.restore()
            if state.graph is not None:
                state.graph.replay()
            else:
                run()
        return state.result(n)
