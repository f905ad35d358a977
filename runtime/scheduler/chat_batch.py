"""Token-level continuous batching of image understanding over the graph contract.

Admitted questions are prefilled together; every iteration then decodes one token for every
active row in one `llm_decode` call, and a row leaves at EOS or its limit, freeing its slot.

K/V storage is allocated once, at the first prefill: per layer one key and one value tensor
[slots, Hkv, max_len, Dh]. Rows are stored right-aligned on a common end column `end` (row r
holds its `length` tokens at columns [end - length, end)), so the `past` of all rows is the one
strided view [:rows, :, end - L : end] with L the longest row, and each step writes every row's
new K/V at column `end`. Columns left of a row's tokens are masked; they hold finite values only
(the store starts zeroed and a row that produced NaN is zeroed before it leaves), because a
masked NaN would still poison the attention product. When `end` reaches `max_len` the rows are
shifted back to the start. A leaving row's slot is filled by the last row, keeping slots dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from jfexport.reference.graph_contract import count_layers, kv_name
from jfexport.reference.pipelines.layout import understanding_positions
from jfexport.reference.schedulers import sample_next

from jfexport.reference.errors import InputError

from ..engine import Engine
from ..errors import NonFiniteOutput
from .requests import ChatJob, ChatRow


def splice_image_embeds(text_embeds: torch.Tensor, image_embeds: torch.Tensor, images_seq_mask: torch.Tensor,
                        images_emb_mask: torch.Tensor) -> torch.Tensor:
    """Overwrite the BOI + placeholder positions with the image blocks (official `prepare_inputs_embeds`)."""
    b, n = images_emb_mask.shape[:2]
    blocks = image_embeds.view(b, n, image_embeds.shape[1], image_embeds.shape[2])
    out = text_embeds.clone()
    out[images_seq_mask] = blocks[images_emb_mask].to(out.dtype)
    return out


@dataclass(eq=False)  # identity: rows hold tensors, and two rows are never the same row
class _Active:
    job: ChatJob
    row: ChatRow
    length: int  # tokens in the cache
    produced: int = 0

    @property
    def last_token(self) -> int:
        return self.row.tokens[-1]


Failure = tuple[ChatJob, BaseException]


class ChatSlots:
    def __init__(self, engines: Mapping[str, Engine], processor, max_rows: int, max_len: int,
                 kv_budget_bytes: int, observe: Callable[[str, int], None]):
        self.engines, self.processor = engines, processor
        self.max_rows, self.max_len, self.kv_budget_bytes = max_rows, max_len, kv_budget_bytes
        self.observe = observe
        self.store: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.slots = max_rows  # lowered to what the K/V budget holds once the store's layout is known
        self.rows: list[_Active] = []
        self.end = 0

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
        """Prefill the new rows of `jobs` together, choose their first tokens, give them slots."""
        pairs = [(job, row) for job in jobs for row in job.chat_rows]
        batch = self.processor.understanding_rows([r.ids for _, r in pairs], [r.pixels for _, r in pairs])
        out, mask = self._prefill_outputs(batch)
        self.observe("prefill", len(pairs))
        if self.store is None:
            self._allocate(out)
        if len(self.rows) + len(pairs) > self.slots:
            # Only the first prefill can meet this: the K/V budget is known once the store is sized.
            raise InputError(f"{len(pairs)} questions at once, the K/V cache holds {self.slots} rows "
                             "(raise kv_budget_bytes or ask fewer at once)")
        logits = out["logits"].float()
        width = mask.shape[1]
        lengths = mask.sum(dim=1).tolist()
        failed: dict[ChatJob, BaseException] = {}
        for i, (job, _) in enumerate(pairs):
            if job not in failed and not torch.isfinite(logits[i]).all():
                failed[job] = NonFiniteOutput("llm_prefill: output 'logits' has NaN/Inf values for this request")
        for i, (job, row) in enumerate(pairs):
            if job in failed:
                continue
            n = int(lengths[i])
            self._place(out, i, width - n, n)
            active = _Active(job, row, n)
            self.rows.append(active)
            self._emit(active, logits[i])
        return list(failed.items())

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

    def _allocate(self, out: Mapping[str, torch.Tensor]) -> None:
        k0 = out[kv_name("present", 0, "key")]
        layers, heads, head_dim = count_layers(out), k0.shape[1], k0.shape[3]
        per_row = 2 * layers * heads * self.max_len * head_dim * k0.element_size()
        self.slots = max(1, min(self.max_rows, self.kv_budget_bytes // per_row))
        shape = (self.slots, heads, self.max_len, head_dim)
        self.store = [(torch.zeros(shape, dtype=k0.dtype, device=k0.device),
                       torch.zeros(shape, dtype=k0.dtype, device=k0.device)) for _ in range(layers)]

    def _place(self, out: Mapping[str, torch.Tensor], i: int, start: int, n: int) -> None:
        """Row i of a prefill output (its tokens at columns [start, start+n)) into the next free slot."""
        if self.end < n:
            self._move(self.end, n)
        slot, end = len(self.rows), self.end
        for layer, (k, v) in enumerate(self.store):
            for store, part in ((k, "key"), (v, "value")):
                store[slot, :, : end - n].zero_()
                store[slot, :, end - n: end] = out[kv_name("present", layer, part)][i, :, start: start + n]

    def _move(self, old_end: int, new_end: int) -> None:
        """Shift the filled columns of all active rows so that they end at `new_end`."""
        width = max((a.length for a in self.rows), default=0)
        if width:
            rows = len(self.rows)
            for k, v in self.store:
                for store in (k, v):
                    store[:rows, :, new_end - width: new_end] = store[:rows, :, old_end - width: old_end].clone()
        self.end = new_end

    def _remove(self, i: int) -> None:
        last = len(self.rows) - 1
        width = max(a.length for a in self.rows)
        if i != last:
            for k, v in self.store:
                for store in (k, v):
                    store[i, :, self.end - width: self.end] = store[last, :, self.end - width: self.end]
            self.rows[i] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.end = 0

    # -- decode ------------------------------------------------------------------------------

    def step(self) -> list[Failure]:
        """One token for every active row; a failing batched call is retried job by job so that
        only the request at fault fails."""
        if self.end == self.max_len:
            self._move(self.end, max(a.length for a in self.rows))
        rows = list(self.rows)
        failures: dict[ChatJob, BaseException] = {}
        try:
            logits = dict(zip(range(len(rows)), self._forward(list(range(len(rows))))))
        except Exception as batch_error:  # noqa: BLE001 - the error is the result of the requests at fault
            jobs = list(dict.fromkeys(a.job for a in rows))
            logits = {}
            for job in jobs:
                if len(jobs) == 1:
                    failures[job] = batch_error
                    break
                idx = [i for i, a in enumerate(rows) if a.job is job]
                try:
                    logits.update(zip(idx, self._forward(idx)))
                except Exception as e:  # noqa: BLE001 - the error is the request's result
                    failures[job] = e
        self.end += 1
        for i, active in enumerate(rows):
            if i not in logits:
                continue
            active.length += 1
            if not torch.isfinite(logits[i]).all():
                failures.setdefault(active.job, NonFiniteOutput("llm_decode: output 'logits' has NaN/Inf values "
                                                                f"at token {active.produced + 1} of this request"))
        for job in failures:
            self._zero(job)
        for i, active in enumerate(rows):
            if active.job not in failures:
                self._emit(active, logits[i])
        return list(failures.items())

    def _forward(self, idx: list[int]) -> torch.Tensor:
        """llm_decode over the slots `idx`, writing their new K/V at column `end`; -> logits [len(idx),V]."""
        rows = [self.rows[i] for i in idx]
        width = max(a.length for a in rows)
        end = self.end
        device = self.store[0][0].device
        prefix = idx == list(range(len(idx)))
        # The active slots are a dense prefix: their past is a view; a retried subset is gathered.
        select = slice(0, len(idx)) if prefix else torch.tensor(idx, device=device)
        past = {}
        for layer, (k, v) in enumerate(self.store):
            past[kv_name("past", layer, "key")] = k[select, :, end - width: end]
            past[kv_name("past", layer, "value")] = v[select, :, end - width: end]
        lengths = torch.tensor([a.length for a in rows], device=device)
        columns = torch.arange(width + 1, device=device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        tokens = torch.tensor([[a.last_token] for a in rows], device=device)
        embeds = self.engines["embed_tokens"].run({"input_ids": tokens})["inputs_embeds"]
        out = self.engines["llm_decode"].run({"inputs_embeds": embeds, "attention_mask": mask,
                                              "position_ids": lengths[:, None], **past})
        self.observe("chat", len(rows))
        for layer, (k, v) in enumerate(self.store):
            k[select, :, end] = out[kv_name("present", layer, "key")][:, :, -1].to(k.device)
            v[select, :, end] = out[kv_name("present", layer, "value")][:, :, -1].to(v.device)
        return out["logits"].float()

    def _zero(self, job: ChatJob) -> None:
        for i, a in enumerate(self.rows):
            if a.job is job:
                for k, v in self.store:
                    k[i].zero_()
                    v[i].zero_()

    def _emit(self, active: _Active, logits: torch.Tensor) -> None:
        """Choose the row's next token; a row that has ended leaves its slot at once."""
        job, row = active.job, active.row
        token = self._choose(active, logits)
        active.produced += 1
        reason = job.push(row, token, logits.cpu() if job.keep_logits else None, active.produced)
        if reason is not None:
            self._remove(self.rows.index(active))

    def _choose(self, active: _Active, logits: torch.Tensor) -> int:
        """The row's next token from its logits [V] (a hook: the fast path chooses on the device)."""
        return int(sample_next(logits[None], active.job.temperature, active.job.top_p, active.row.generator)[0])
