"""Deterministic random weights for presets, independent of module construction order.

Same rule as the golden fixtures' weight generator (one CPU generator per tensor, seeded from
the key): norm scales 1 + 0.1 N, GRN parameters 0.1 N, other vectors and matrices 0.02 N. Unlike
PyTorch's default init this leaves no parameter at zero (GRN, `beg_of_und_embed`), so random
models exercise every path.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def _tensor_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _scale(key: str, ndim: int) -> tuple[float, float]:
    if ".channelwise_norm." in key:
        return 0.1, 0.0
    if ndim == 1 and key.endswith(".weight") and "norm" in key[: -len(".weight")].split(".")[-1].lower():
        return 0.1, 1.0
    return 0.02, 0.0


@torch.no_grad()
def init_random(module: nn.Module, seed: int, names: dict[str, str] | None = None) -> None:
    """Fill every parameter of `module`; `names` maps parameter names to the keys used for seeding."""
    for name, param in module.named_parameters():
        key = (names or {}).get(name, name)
        gen = torch.Generator("cpu").manual_seed(_tensor_seed(seed, key))
        mul, add = _scale(key, param.ndim)
        param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * mul + add)
