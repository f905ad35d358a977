"""The three JanusFlow losses (paper section 3): autoregressive, rectified flow, REPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def ar_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; `labels` hold IGNORE everywhere but the response tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ logit-normal(mean, std) on (0, 1), as SD3 samples rectified-flow times."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def rf_loss(velocity: torch.Tensor, data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """|| v - (x - z0) ||^2 for z_t = t x + (1 - t) z0."""
    return F.mse_loss(velocity.float(), (data - noise).float())


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative mean cosine similarity with the (stop-gradient) understanding features."""
    return -F.cosine_similarity(projected.float(), target.detach().float(), dim=-1).mean()


class RepaHead(nn.Module):
    """h_phi: a 3-layer MLP from LLM width to the understanding encoder's width (paper 3.3)."""

    def __init__(self, llm_dim: int, encoder_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * llm_dim
        self.net = nn.Sequential(nn.Linear(llm_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, encoder_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
