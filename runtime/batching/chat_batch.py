"""Token-level continuous batching of image understanding over the graph contract.

Admitted questions are prefilled together; every iteration then decodes one token for every
active row in one `llm_decode` call, and a row leaves at EOS or its limit, freeing its slot.

K/V live in one `KVCache` (kv_cache.py), allocated once: row i of the batch is slot i, its tokens
left-aligned at columns [0, length). The decode step feeds the cache's contiguous view of the
first `rows` slots as `past` (no gather, no copy) and gets back only the new K/V (`new.*`),
which the cache writes at each row's next column. A leaving row's slot is filled by the last row,
keeping slots dense.

A question whose conversation starts with the tokens (and image) of an earlier request reuses
that request's K/V (`PrefixCache`): its slot is filled from the stored prefix and only the new
tokens run, through `llm_decode` with the prefix as past; time to first token then grows with the
new tokens, not with the conversation.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from jfexport.core.graph_contract import NEW, kv_names
from jfexport.core.layout import understanding_positions
from jfexport.core.schedulers import sample_next

from jfexport.core.errors import InputError

from ..engine import Engine
from ..errors import NonFiniteOutput
from .kv_cache import COLUMN_BUCKET, KVCache, KVLayout, PrefixCache
from .jobs import ChatJob, ChatRow

log = logging.getLogger(__name__)

def splice_image_embeds(text_embeds: torch.Tensor, image_embeds: torch.Tensor, images_seq_mask: torch.Tensor,
                        images_emb_mask: torch.Tensor) -> torch.Tensor:
    """Overwrite the BOI + placeholder positions with the image blocks (official `prepare_inputs_embeds`)."""
    b, n = images_emb_mask.shape[:2]
    blocks = image_embeds.view(b, n, image_embeds.shape[1], image_embeds.shape[2])
    out = text_embeds.clone()
    out[images_seq_mask] = blocks[images_emb_mask].to(out.dtype)
    return out


def image_hash(pixels: torch.Tensor) -> str:
    """Content hash of a row's preprocessed image: the prefix cache's key beside the token ids."""
    return hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass(eq=False)  # identity: rows hold tensors, and two rows are never the same row
class _Active:
    job: ChatJob
    row: ChatRow
    image: str  # image_hash of the row's pixels
    produced: int = 0

    @property
    def last_token(self) -> int:
        return self.row.tokens[-1]


Failure = tuple[ChatJob, BaseException]


class ChatSlots:
    column_bucket = COLUMN_BUCKET

    def __init__(self, engines: Mapping[str, Engine], processor, max_rows: int, max_len: int,
                 kv_budget_bytes: int, observe: Callable[[str, int], None], kv_layout: KVLayout | None = None,
                 prefix_cache_bytes: int = 0):
        self.engines, self.processor = engines, processor
        self.max_rows, self.max_len, self.kv_budget_bytes = max_rows, max_len, kv_budget_bytes
        self.observe = observe
        self.kv_layout = kv_layout
        # Sized from the manifest when it is known; else (engines handed over bare) at the first prefill.
        self.cache: KVCache | None = self._make_cache(kv_layout) if kv_layout is not None else None
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.slots = self.cache.slots if self.cache is not None else max_rows
        self.rows: list[_Active] = []

    def _make_cache(self, layout: KVLayout) -> KVCache:
        device = getattr(self.engines.get("llm_decode"), "device", "cpu")
        return KVCache.within_budget(layout, self.max_rows, self.max_len, self.kv_budget_bytes, device,
                                     self.column_bucket)

    @property
    def active_rows(self) -> int:
        return len(self.rows)

    def fits(self, job: ChatJob) -> bool:
        return len(self.rows) + job.rows <= self.slots

    def jobs(self) -> set[ChatJob]:
        return {a.job for a in self.rows}

    def drop(self, job: ChatJob) -> None:
        """Free every slot of `job` (cancelled, timed out or failed)."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].job is job:
                self._remove(i)

    # -- prefill -----------------------------------------------------------------------------

    def prefill(self, jobs: list[ChatJob]) -> list[Failure]:
        """Prefill the new rows of `jobs` (together, or from a stored prefix), choose their first tokens,
        give them slots."""
        pairs = [(job, row, image_hash(row.pixels)) for job in jobs for row in job.chat_rows]
        if self.cache is not None:
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
        out, mask = self._prefill_outputs(batch)
        self.observe("prefill", len(pairs))
        if self.cache is None:
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
            logits = self._forward([slot], [row.ids[count:]])[0]
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

    def _prefill_outputs(self, batch) -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
        """(llm_prefill outputs, attention mask [n, width]) of a processor batch (a hook: the fast
        path calls the model directly)."""
        e = self.engines
        image_embeds = e["vision_encoder"].run({"pixel_values": batch.pixel_values.flatten(0, 1)})["image_embeds"]
        text_embeds = e["embed_tokens"].run({"input_ids": batch.input_ids})["inputs_embeds"]
        device = text_embeds.device
        embeds = splice_image_embeds(text_embeds, image_embeds, batch.images_seq_mask.to(device),
                                     batch.images_emb_mask.to(device))
        mask = batch.attention_mask.to(device)
        out = e["llm_prefill"].run({"inputs_embeds": embeds, "attention_mask": mask,
                                    "position_ids": understanding_positions(mask)})
        return out, mask

    def _remove(self, i: int) -> None:
        self.cache.release(i)
        last = len(self.rows) - 1
        self.rows[i] = self.rows[last]
        self.rows.pop()

    # -- decode ------------------------------------------------------------------------------

    def step(self) -> list[Failure]:
        """One token for every active row; a failing batched call is retried job by job so that
        only the request at fault fails."""
        rows = list(self.rows)
        failures: dict[ChatJob, BaseException] = {}
        last = [[a.last_token] for a in rows]
        try:
            logits = dict(zip(range(len(rows)), self._forward(list(range(len(rows))), last)))
        except Exception as batch_error:  # noqa: BLE001 - the error is the result of the requests at fault
            jobs = list(dict.fromkeys(a.job for a in rows))
            logits = {}
            for job in jobs:
                if len(jobs) == 1:
                    failures[job] = batch_error
                    break
                idx = [i for i, a in enumerate(rows) if a.job is job]
                try:
                    logits.update(zip(idx, self._forward(idx, [last[i] for i in idx])))
                except Exception as e:  # noqa: BLE001 - the error is the request's result
                    failures[job] = e
        for i, active in enumerate(rows):
            if i in logits and not torch.isfinite(logits[i]).all():
                failures.setdefault(active.job, NonFiniteOutput("llm_decode: output 'logits' has NaN/Inf values "
                                                                f"at token {active.produced + 1} of this request"))
        for job in failures:
            self._zero(job)
        for i, active in enumerate(rows):
            if active.job not in failures:
                self._emit(active, logits[i])
        return list(failures.items())

    def _forward(self, slots: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """llm_decode of `tokens` (the same count T per row) over the K/V of `slots`, whose new K/V
        the cache then holds; -> logits [len(slots),V] of each row's last token."""
        cache = self.cache
        t = len(tokens[0])
        cache.fit(max(cache.lengths[s] for s in slots) + t)
        n = len(slots)
        dense = slots == list(range(n))
        if dense:
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
        embeds = self.engines["embed_tokens"].run({"input_ids": torch.tensor(tokens, device=device)})["inputs_embeds"]
        new = kv_names(NEW, cache.layout.layers)
        out = self.engines["llm_decode"].run({"inputs_embeds": embeds, "attention_mask": mask,
                                              "position_ids": positions, **past},
                                             outputs=cache.staging(n) if t == 1 else None, names=("logits", *new))
        self.observe("chat", n)
        cache.append(slots, out)
        return out["logits"].float()

    def _zero(self, job: ChatJob) -> None:
        for i, a in enumerate(self.rows):
            if a.job is job:
                self.cache.zero(i)

    def _emit(self, active: _Active, logits: torch.Tensor) -> None:
        """Choose the row's next token; a row that has ended leaves its slot at once."""
        job, row = active.job, active.row
        token = self._choose(active, logits)
        active.produced += 1
        reason = job.push(row, token, logits.cpu() if job.keep_logits else None, active.produced)
        if reason is not None:
            self._leave(active)

    def _leave(self, active: _Active) -> None:
        """A row that ended: its K/V (prompt and every answer token fed back) are kept for a follow-up
        turn, then its slot is freed."""
        i = self.rows.index(active)
        count = self.cache.lengths[i]
        if count * self.cache.layout.token_bytes <= self.prefixes.budget_bytes:  # else it would not be kept
            ids = (active.row.ids + active.row.tokens)[:count]
            self.prefixes.store(active.image, ids, self.cache.copy_out(i, count))
        self._remove(i)

    def _choose(self, active: _Active, logits: torch.Tensor) -> int:
        """The row's next token from its logits [V] (a hook: the fast path chooses on the device)."""
        return int(sample_next(logits[None], active.job.temperature, active.job.top_p, active.row.generator)[0])
