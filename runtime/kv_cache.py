"""Preallocated K/V storage for incremental decoding.

The graph contract returns `present` = past + new tokens as a dense [B,Hkv,P+T,Dh] tensor. The
cache owns two flat buffers per layer, each big enough for the longest sequence of the request,
and alternates between them: the current one is fed as `past`, the other receives `present`
(backends that bind outputs write straight into it), then they swap. Dense prefixes of a flat
buffer are contiguous, so no step allocates or re-packs the cache.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self, layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device
    ):
        self.layers, self.batch, self.kv_heads, self.head_dim, self.max_len = layers, batch, kv_heads, head_dim, max_len
        size = batch * kv_heads * max_len * head_dim
        # [2 ping-pong sides][layer][key, value]
        self._buffers = [
            [[torch.empty(size, dtype=dtype, device=device) for _ in range(2)] for _ in range(layers)] for _ in range(2)
        ]
        self._side = 0
        self.length = 0

    def _view(self, side: int, layer: int, which: int, length: int) -> torch.Tensor:
        flat = self._buffers[side][layer][which]
        return flat[: self.batch * self.kv_heads * length * self.head_dim].view(self.batch, self.kv_heads, length, self.head_dim)

    def past(self) -> dict[str, torch.Tensor]:
        """`past.{i}.key/value` [B,Hkv,length,Dh] views of the filled cache."""
        out: dict[str, torch.Tensor] = {}
        for i in range(self.layers):
            out[f"past.{i}.key"] = self._view(self._side, i, 0, self.length)
            out[f"past.{i}.value"] = self._view(self._side, i, 1, self.length)
        return out

    def present_buffers(self, new_len: int) -> dict[str, torch.Tensor]:
        """Where a backend may write `present.{i}.key/value` for a step ending at `new_len`."""
        if new_len > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {new_len} requested")
        other = 1 - self._side
        out: dict[str, torch.Tensor] = {}
        for i in range(self.layers):
            out[f"present.{i}.key"] = self._view(other, i, 0, new_len)
            out[f"present.{i}.value"] = self._view(other, i, 1, new_len)
        return out

    def commit(self, outputs: dict[str, torch.Tensor]) -> None:
        """Make the step's `present` tensors the cache, copying only if the backend did not write in place."""
        new_len = outputs["present.0.key"].shape[2]
        targets = self.present_buffers(new_len)
        for name, target in targets.items():
            src = outputs[name]
            if src.data_ptr() != target.data_ptr():
                target.copy_(src)
        self._side = 1 - self._side
        self.length = new_len
