"""Normalisation layers with the exact rounding order of the official modules."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: statistics in fp32, cast back to the input dtype, *then* scale.

    The official UViT imports LlamaRMSNorm for every RMSNorm it has, so this order is the one
    a low-precision engine must keep (JANUSFLOW.md 3, pitfall 13).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
