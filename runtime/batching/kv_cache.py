"""The K/V cache of understanding: one store, allocated once, updated in place.

Per layer one key and one value buffer of `slots * Hkv * max_len * Dh` elements, allocated when the
cache is made (sized from the manifest: layers, K/V heads, head_dim, dtype, max_seq; as many
slots as `kv_budget_bytes` holds, at most `max_rows`). The buffer is viewed as
[slots, Hkv, width, Dh] for the current `width` (columns per slot): the first `rows` slots are
then one contiguous [rows, Hkv, width, Dh] tensor, which is `llm_decode`'s `past` as it stands:
the engines read the cache where it is, nothing is gathered or copied per token (ONNX Runtime
binds it as an OrtValue over this memory, TensorRT by address).

Rows are left-aligned: slot s holds its `lengths[s]` tokens at columns [0, lengths[s]), and a
decode step writes each row's new K/V (the graph's `new.*` outputs) at its own next column.
Columns past a row's length are masked (or causally hidden) and hold finite values only: the
store starts zeroed, and a row that produced NaN is zeroed before it leaves, since a masked NaN
would still poison the attention product.

Slots in use are kept dense (0 .. rows-1), because ONNX Runtime and TensorRT take one dense tensor
per input: a freed slot is filled by the last one (`release`). For the same reason every row of a
batch is fed `width` columns: the longest row's length rounded up to `bucket` (ONNX Runtime's and
TensorRT's standard attention has no per-row lengths; ONNX Runtime's GroupQueryAttention contrib
op has, but TensorRT cannot parse it, and a row pays at most `bucket` columns above the longest
row, not the whole `max_len`). Changing `width` moves the live columns once (`fit`), which with
a bucket of 64 columns costs one extra read and write of the live K/V every 64 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from jfexport.core.graph_contract import NEW, PAST, PRESENT, count_layers, kv_name
from jfexport.core.manifest import SpecRecord

# Columns per slot are a multiple of this.
COLUMN_BUCKET = 64


@dataclass(frozen=True)
class KVLayout:
    """What one token of one row holds in the cache."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K/V over all layers (key and value)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def from_spec(cls, spec: SpecRecord, precision: str) -> "KVLayout":
        """From `llm_decode`'s spec as the manifest records it, served at `precision` (an fp16 graph's
        K/V are fp16; INT8 graphs keep fp32 activations)."""
        extra = spec.extra
        return cls(extra["layers"], extra["kv_heads"], extra["head_dim"],
                   torch.float16 if precision == "fp16" else torch.float32)

    @classmethod
    def from_present(cls, outputs: Mapping[str, torch.Tensor]) -> "KVLayout":
        """From an `llm_prefill` output (engines handed over without their manifest)."""
        k0 = outputs[kv_name(PRESENT, 0, "key")]
        return cls(count_layers(outputs), k0.shape[1], k0.shape[3], k0.dtype)


class KVCache:
    def __init__(self, layout: KVLayout, slots: int, max_len: int, device: torch.device | str,
                 bucket: int = COLUMN_BUCKET):
        self.layout, self.slots, self.max_len, self.bucket = layout, slots, max_len, bucket
        size = slots * layout.kv_heads * max_len * layout.head_dim
        new = slots * layout.kv_heads * layout.head_dim
        # Plain tensors even where the runtime is made under inference_mode: the scheduler's thread
        # updates them outside it.
        with torch.inference_mode(False):
            self.buffers = [(torch.zeros(size, dtype=layout.dtype, device=device),
                             torch.zeros(size, dtype=layout.dtype, device=device)) for _ in range(layout.layers)]
            # Where a one-token decode step writes its new K/V (bound as the graph's outputs): [slots,Hkv,1,Dh].
            self._staging = [(torch.zeros(new, dtype=layout.dtype, device=device),
                              torch.zeros(new, dtype=layout.dtype, device=device)) for _ in range(layout.layers)]
        self.lengths: list[int] = []  # tokens held by each slot in use; slots 0 .. rows-1
        self.width = min(bucket, max_len)

    @classmethod
    def within_budget(cls, layout: KVLayout, max_rows: int, max_len: int, budget_bytes: int,
                      device: torch.device | str, bucket: int = COLUMN_BUCKET) -> "KVCache":
        slots = max(1, min(max_rows, budget_bytes // (layout.token_bytes * max_len)))
        return cls(layout, slots, max_len, device, bucket)

    @property
    def device(self) -> torch.device:
        return self.buffers[0][0].device

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def view(self, buffer: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """`buffer` as [rows, Hkv, width, Dh] (contiguous): the first `rows` slots (default: all)."""
        n = self.slots if rows is None else rows
        lay = self.layout
        return buffer[: n * lay.kv_heads * self.width * lay.head_dim].view(n, lay.kv_heads, self.width, lay.head_dim)

    def layers(self, rows: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value) views of the first `rows` slots."""
        return [(self.view(k, rows), self.view(v, rows)) for k, v in self.buffers]

    def past(self, rows: int) -> dict[str, torch.Tensor]:
        """`llm_decode`'s past inputs for slots 0 .. rows-1: views of the store, no copy."""
        feeds = {}
        for layer, (k, v) in enumerate(self.layers(rows)):
            feeds[kv_name(PAST, layer, "key")], feeds[kv_name(PAST, layer, "value")] = k, v
        return feeds

    def staging(self, rows: int) -> dict[str, torch.Tensor]:
        """Output buffers [rows,Hkv,1,Dh] for a one-token decode step's `new.*` (allocated once)."""
        lay, out = self.layout, {}
        for layer, (k, v) in enumerate(self._staging):
            for buf, part in ((k, "key"), (v, "value")):
                out[kv_name(NEW, layer, part)] = buf[: rows * lay.kv_heads * lay.head_dim].view(
                    rows, lay.kv_heads, 1, lay.head_dim)
        return out

    def mask(self, lengths: list[int], new: int) -> torch.Tensor:
        """[rows, width + new] attention mask of rows holding `lengths` tokens: their filled columns,
        then their `new` tokens."""
        filled = torch.tensor(lengths, device=self.device)
        columns = torch.arange(self.width + new, device=self.device)
        return ((columns[None, :] < filled[:, None]) | (columns[None, :] >= self.width)).long()

    # -- slots -------------------------------------------------------------------------------

    def acquire(self) -> int:
        """A free slot (the next dense one), empty; the caller fills it (`put`) before decoding it."""
        if self.rows == self.slots:
            raise RuntimeError("the K/V cache has no free slot")  # callers admit within `free`
        self.lengths.append(0)
        return self.rows - 1

    @property
    def free(self) -> int:
        return self.slots - self.rows

    def release(self, slot: int) -> None:
        """Free `slot`; the last slot moves into it (its columns copied), keeping the slots in use dense."""
        last = self.rows - 1
        if slot != last:
            n = self.lengths[last]
            for k, v in self.layers():
                k[slot, :, :n] = k[last, :, :n]
                v[slot, :, :n] = v[last, :, :n]
            self.lengths[slot] = n
        self.lengths.pop()

    def zero(self, slot: int) -> None:
        """Zero a slot (a row that produced NaN leaves nothing non-finite behind)."""
        for k, v in self.layers():
            k[slot].zero_()
            v[slot].zero_()

    # -- columns -----------------------------------------------------------------------------

    def fit(self, columns: int) -> None:
        """Make every slot hold at least `columns` columns (rounded up to the bucket, at most max_len);
        a width twice what is needed shrinks, so rows stop paying for a long row that left."""
        columns = max(columns, max(self.lengths, default=0), 1)
        need = min(self.max_len, -(-columns // self.bucket) * self.bucket)
        if need > self.width or 2 * need <= self.width:
            self._relayout(need)

    def _relayout(self, width: int) -> None:
        rows, keep = self.rows, min(self.width, width)
        lay = self.layout
        for pair in self.buffers:
            for flat in pair:
                old = flat[: rows * lay.kv_heads * self.width * lay.head_dim].view(rows, lay.kv_heads, self.width, -1)
                live = old[:, :, :keep].clone()
                flat[: rows * lay.kv_heads * width * lay.head_dim].view(rows, lay.kv_heads, width, -1)[:, :, :keep] = live
        self.width = width

    def put(self, slot: int, start: int, kv: Mapping[str, torch.Tensor], row: int, first: int, count: int,
            prefix: str = PRESENT) -> None:
        """Columns [first, first+count) of row `row` of graph outputs `kv` (`prefix.*` [B,Hkv,L,Dh]) into
        `slot` at columns [start, start+count); the slot then holds start + count tokens."""
        self.fit(start + count + 1)
        for layer, (k, v) in enumerate(self.layers()):
            k[slot, :, start: start + count] = kv[kv_name(prefix, layer, "key")][row, :, first: first + count]
            v[slot, :, start: start + count] = kv[kv_name(prefix, layer, "value")][row, :, first: first + count]
        self.lengths[slot] = start + count

    def append(self, slots: list[int], out: Mapping[str, torch.Tensor]) -> None:
        """A decode step's `new.*` outputs [len(slots),Hkv,T,Dh] written at each slot's next columns."""
        t = out[kv_name(NEW, 0, "key")].shape[2]
        if all(s == i for i, s in enumerate(slots)) and len(set(self.lengths[: len(slots)])) == 1:
            start = self.lengths[0]  # one column for all rows: one strided copy per tensor
            for layer, (k, v) in enumerate(self.layers(len(slots))):
                k[:, :, start: start + t] = out[kv_name(NEW, layer, "key")]
                v[:, :, start: start + t] = out[kv_name(NEW, layer, "value")]
        else:
            index = torch.tensor([[self.lengths[s] + j for j in range(t)] for s in slots], device=self.device)
            rows = torch.tensor(slots, device=self.device)
            lay = self.layout
            for layer, (k, v) in enumerate(self.layers()):
                for store, part in ((k, "key"), (v, "value")):
                    new = out[kv_name(NEW, layer, part)].to(store.dtype)
                    # store[rows[i], h, index[i, j]] = new[i, h, j]
                    store[rows[:, None, None], torch.arange(lay.kv_heads, device=self.device)[None, :, None],
                          index[:, None, :]] = new
        for s in slots:
            self.lengths[s] += t

    def copy_out(self, slot: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the slot's first `count` columns, per layer [Hkv, count, Dh] (for the prefix cache)."""
        return [(k[slot, :, :count].clone(), v[slot, :, :count].clone()) for k, v in self.layers()]

    def copy_in(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]], count: int) -> None:
        """The first `count` columns of per-layer [Hkv, L, Dh] tensors into `slot` (which then holds count)."""
        self.fit(count + 1)
        for (k, v), (pk, pv) in zip(self.layers(), kv):
            k[slot, :, :count] = pk[:, :count]
            v[slot, :, :count] = pv[:, :count]
        self.lengths[slot] = count
