"""Token-level continuous batching of image understanding: the policy over a chat executor.

Admitted questions are prefilled together; every iteration then runs one decode step
(decode_step.py) for every active row in one executor call (one token per row on the engine path,
a chunk of k on the torch path), and a row leaves at EOS or its limit, freeing its slot. The
executor (engines or the model called directly) is chosen by whoever builds `ChatSlots`.

K/V live in one `KVCache` (kv_cache.py), allocated once: row i of the batch is slot i, its tokens
left-aligned at columns [0, length). A decode step reads the cache's contiguous view of the first
`rows` slots (no gather, no copy) and writes each row's new K/V at its next column. A leaving
row's slot is filled by the last row, keeping slots dense.

A question whose conversation starts with the tokens (and image) of an earlier request reuses
that request's K/V (`PrefixCache`): its slot is filled from the stored prefix and only the new
tokens run, through the executor's `forward` with the prefix as past; time to first token then grows with the
new tokens, not with the conversation.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from jfexport.core.errors import InputError
from jfexport.core.schedulers import TokenLogprobs, token_logprobs

from ..errors import NonFiniteOutput, RuntimeFailure
from .decode_step import ChatExecutor, DecodeRow, first_token
from .jobs import ChatJob, ChatPart, ChatRow
from .kv_cache import KVCache, KVLayout
from .prefix_cache import PrefixCache

log = logging.getLogger(__name__)


def image_hash(pixels: torch.Tensor) -> str:
    """Content hash of a row's preprocessed image: the prefix cache's key beside the token ids."""
    return hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass(eq=False)  # identity: rows hold tensors, and two rows are never the same row
class _Active:
    job: ChatJob
    row: ChatRow
    image: str  # image_hash of the row's pixels
    produced: int = 0

    def decode_row(self, length: int) -> DecodeRow:
        job, row = self.job, self.row
        # Before its first token a row has nothing to feed: that choice comes from the prefill's logits.
        return DecodeRow(row.tokens[-1] if row.tokens else 0, length, job.temperature, job.top_p, row.generator,
                         job.rule.max_new_tokens - self.produced, job.rule.eos_id, keep_logits=job.keep_logits,
                         logprobs=job.top_logprobs)


Failure = tuple[ChatJob, BaseException]


class ChatSlots:
    """The chat side of the scheduler: which rows hold which K/V slots, and what happens to them
    (admission fit, prefix reuse, failures attributed to their request, rows leaving). The LLM runs
    in `executor` (decode_step.py), one call per decode step for all rows."""

    def __init__(self, executor: ChatExecutor, processor, max_rows: int, max_len: int, kv_budget_bytes: int,
                 observe: Callable[[str, int], None], kv_layout: KVLayout | None = None, prefix_cache_bytes: int = 0):
        self.executor, self.processor = executor, processor
        self.max_rows, self.max_len, self.kv_budget_bytes = max_rows, max_len, kv_budget_bytes
        self.observe = observe
        self.kv_layout = kv_layout
        # Sized from the manifest when it is known; else (engines handed over bare) at the first prefill.
        self._cache: KVCache | None = self._make_cache(kv_layout) if kv_layout is not None else None
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.slots = self._cache.slots if self._cache is not None else max_rows
        self.rows: list[_Active] = []

    @property
    def cache(self) -> KVCache:
        """The K/V slots of the rows in flight."""
        if self._cache is None:
            raise RuntimeFailure("chat: no K/V cache yet: without a layout it is sized at the first prefill")
        return self._cache

    @cache.setter
    def cache(self, cache: KVCache) -> None:
        self._cache = cache

    def _make_cache(self, layout: KVLayout) -> KVCache:
        return KVCache.within_budget(layout, self.max_rows, self.max_len, self.kv_budget_bytes, self.executor.device,
                                     self.executor.column_bucket)

    @property
    def active_rows(self) -> int:
        return len(self.rows)

    def jobs(self) -> set[ChatJob]:
        return {a.job for a in self.rows}

    def drop(self, job: ChatJob) -> None:
        """Free every slot of `job` (cancelled, timed out or failed)."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].job is job:
                self._remove(i)

    # -- prefill -----------------------------------------------------------------------------

    def prefill(self, parts: list[ChatPart]) -> list[Failure]:
        """Prefill the rows of `parts` (together, or from a stored prefix), choose their first tokens,
        give them slots."""
        pairs = [(part.job, row, image_hash(row.pixels)) for part in parts for row in part.chat_rows]
        if self._cache is not None:
            self._check_room(len(pairs))
        failed: dict[ChatJob, BaseException] = {}
        fresh = []
        for job, row, image in pairs:
            hit = self._stored_prefix(row, image)
            if hit is None or not self._prefill_from(job, row, image, hit[0].kv, hit[1], failed):
                fresh.append((job, row, image))
        if fresh:
            self._prefill_fresh(fresh, failed)
        return list(failed.items())

    def _check_room(self, count: int) -> None:
        # Only a first prefill can meet this where the cache is sized then: the admission counts slots.
        if len(self.rows) + count > self.slots:
            raise InputError(f"{count} questions at once, the K/V cache holds {self.slots} rows "
                             "(raise kv_budget_bytes or ask fewer at once)")

    def _stored_prefix(self, row: ChatRow, image: str):
        """(stored prefix, tokens reused) for a row whose start an earlier request computed, or None.
        The image must lie within the reused part: the new tokens run without the vision encoder."""
        if not self.prefixes.budget_bytes:
            return None
        tok = self.processor.tokenizer
        last_image = len(row.ids) - 1 - row.ids[::-1].index(tok.image_id) if tok.image_id in row.ids else -1
        return self.prefixes.longest(image, row.ids, at_least=last_image + 1)

    def _prefill_fresh(self, pairs: list[tuple[ChatJob, ChatRow, str]], failed: dict) -> None:
        batch = self.processor.understanding_rows([r.ids for _, r, _ in pairs], [r.pixels for _, r, _ in pairs])
        out, mask = self.executor.prefill(batch)
        self.observe("prefill", len(pairs))
        if self._cache is None:
            self.cache = self._make_cache(KVLayout.from_present(out))
            self.slots = self.cache.slots
            self._check_room(len(pairs))
        logits = out["logits"].float()
        width = mask.shape[1]
        lengths = mask.sum(dim=1).tolist()
        for i, (job, _, _) in enumerate(pairs):
            if job not in failed and not torch.isfinite(logits[i]).all():
                failed[job] = NonFiniteOutput("llm_prefill: output 'logits' has NaN/Inf values for this request")
        for i, (job, row, image) in enumerate(pairs):
            if job in failed:
                continue
            n = int(lengths[i])
            slot = self.cache.acquire()
            self.cache.put(slot, 0, out, i, width - n, n)
            active = _Active(job, row, image)
            self.rows.append(active)
            self._emit(active, logits[i])

    def _prefill_from(self, job: ChatJob, row: ChatRow, image: str, kv, count: int, failed: dict) -> bool:
        """A row whose first `count` tokens' K/V are stored: only the rest runs, over that past. False
        where the engine cannot run them so (a TensorRT build's decode profiles take T = 1 or the
        image tokens' T only): the row is then prefilled in full, with the same result."""
        slot = self.cache.acquire()
        active = _Active(job, row, image)
        self.rows.append(active)
        self.cache.copy_in(slot, kv, count)
        try:
            logits = self.executor.forward(self.cache, [slot], torch.tensor([row.ids[count:]]))[0]
            self.observe("chat", 1)
        except Exception:  # noqa: BLE001 - a whole prefill follows, which raises again if the request is at fault
            log.warning("prefix reuse failed for this row; it is prefilled in full", exc_info=True)
            self._remove(self.rows.index(active))
            return False
        if not torch.isfinite(logits).all():
            failed[job] = NonFiniteOutput("llm_decode: output 'logits' has NaN/Inf values for this request")
            self._zero(job)
            return True
        self._emit(active, logits)
        return True

    def _remove(self, i: int) -> None:
        self.cache.release(i)
        last = len(self.rows) - 1
        self.rows[i] = self.rows[last]
        self.rows.pop()

    # -- decode ------------------------------------------------------------------------------

    def step(self) -> list[Failure]:
        """One decode step for every active row (the executor's chunk of tokens each); a failing batched
        call is retried job by job so that only the request at fault fails."""
        rows = list(self.rows)
        cache = self.cache
        longest = max(cache.lengths)
        k = min(self.executor.chunk, max(a.job.rule.max_new_tokens - a.produced for a in rows), self.max_len - longest)
        cache.fit(longest + k)
        failures: dict[ChatJob, BaseException] = {}
        decoded: dict[int, tuple] = {}  # row -> (tokens, first bad step, logits, logprobs)
        try:
            self._decode(rows, list(range(len(rows))), k, decoded)
        except Exception as batch_error:  # noqa: BLE001 - the error is the result of the requests at fault
            jobs = list(dict.fromkeys(a.job for a in rows))
            for job in jobs:
                if len(jobs) == 1:
                    failures[job] = batch_error
                    break
                try:
                    self._decode(rows, [i for i, a in enumerate(rows) if a.job is job], k, decoded)
                except Exception as e:  # noqa: BLE001 - the error is the request's result
                    failures[job] = e
        for i, active in enumerate(rows):
            if i in decoded and decoded[i][1] >= 0:
                failures.setdefault(active.job, NonFiniteOutput(
                    f"llm_decode: output 'logits' has NaN/Inf values at token {active.produced + decoded[i][1] + 1} "
                    "of this request"))
        for job in failures:
            self._zero(job)
        for i, active in enumerate(rows):
            if active.job not in failures:
                tokens, _, logits, logprobs = decoded[i]
                self._push(active, tokens, logits, logprobs)
        return list(failures.items())

    def _decode(self, rows: list[_Active], idx: list[int], k: int, decoded: dict) -> None:
        """One executor call for rows `idx` (held by the slots of those numbers)."""
        out = self.executor.decode(self.cache, [rows[i].decode_row(self.cache.lengths[i]) for i in idx], idx, k,
                                   any(rows[i].job.wants_logits for i in idx))
        self.observe("chat", len(idx))
        for j, i in enumerate(idx):
            decoded[i] = (out.tokens[j], out.first_bad[j], None if out.logits is None else out.logits[j],
                          None if out.logprobs is None else out.logprobs[j])

    def _zero(self, job: ChatJob) -> None:
        for i, a in enumerate(self.rows):
            if a.job is job:
                self.cache.zero(i)

    def _emit(self, active: _Active, logits: torch.Tensor) -> None:
        """The row's first token, from its prefill logits [V]."""
        i = self.rows.index(active)
        token = first_token(logits, active.decode_row(self.cache.lengths[i]), self.executor.draws_ahead)
        job = active.job
        self._push(active, [token], logits[None].cpu() if job.keep_logits else None,
                   None if job.top_logprobs is None else token_logprobs(logits[None], [token], job.top_logprobs))

    def _push(self, active: _Active, tokens: list[int], logits: torch.Tensor | None,
              logprobs: list[TokenLogprobs] | None) -> None:
        """The row's tokens of this step up to the one that ends it; a row that has ended leaves its slot at once."""
        job = active.job
        for j, token in enumerate(tokens):
            active.produced += 1
            reason = job.push(active.row, token, None if logits is None else logits[j], active.produced,
                              None if logprobs is None else logprobs[j])
            if reason is not None:
                # Its columns past the end token hold the step's padding tokens: only `count` are kept.
                self.cache.lengths[self.rows.index(active)] -= len(tokens) - 1 - j
                self._leave(active)
                return

    def _leave(self, active: _Active) -> None:
        """A row that ended: its K/V (prompt and every answer token fed back) are kept for a follow-up
        turn, then its slot is freed."""
        i = self.rows.index(active)
        count = self.cache.lengths[i]
        if count * self.cache.layout.token_bytes <= self.prefixes.budget_bytes:  # else it would not be kept
            ids = (active.row.ids + active.row.tokens)[:count]
            self.prefixes.store(active.image, ids, self.cache.copy_out(i, count))
        self._remove(i)
