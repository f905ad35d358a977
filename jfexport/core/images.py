"""The two ends of text-to-image outside the graphs: the initial noise and the uint8 conversion."""

from __future__ import annotations

import torch


def initial_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Noise drawn like the official demo: CPU generator, directly in the sampling dtype."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> [B,H,W,3] uint8, truncating like the official demo (JANUSFLOW.md 4.7)."""
    x = (images.float().clamp(-1, 1) + 1) / 2 * 255
    return x.permute(0, 2, 3, 1).to(torch.uint8)
