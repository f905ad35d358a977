"""JanusFlow's generation encoder/decoder (ShallowUViT): patchify conv, ConvNeXt blocks with
GlobalResponseNorm and FiLM time conditioning, RMSNorm + 1x1 conv + pixel-shuffle unpatchify.

Module and parameter names follow the official `uvit.py`, so the official state dict loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from jfexport.core.config import GenDecoderConfig, GenEncoderConfig

from .norms import RMSNorm


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC input: L2 over the *spatial* axes, divided by its channel mean + eps."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.bias + (self.weight * nx + 1) * x


class ConvNextBlock(nn.Module):
    def __init__(self, channels: int, cond_dim: int, norm_eps: float, use_bias: bool, ffn_factor: int = 4):
        super().__init__()
        hidden = channels * ffn_factor
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels, bias=use_bias)
        self.norm = RMSNorm(channels, norm_eps)
        self.channelwise_linear_1 = nn.Linear(channels, hidden, bias=use_bias)
        self.channelwise_act = nn.GELU()
        self.channelwise_norm = GlobalResponseNorm(hidden)
        self.channelwise_linear_2 = nn.Linear(hidden, channels, bias=use_bias)
        self.cond_embeds_mapper = nn.Linear(cond_dim, channels * 2, bias=use_bias)

    def film(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) for a time embedding; depends on the step only, so engines may precompute it."""
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)
        return scale, shift

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.depthwise(x).permute(0, 2, 3, 1)
        x = self.channelwise_linear_2(self.channelwise_norm(self.channelwise_act(self.channelwise_linear_1(self.norm(x)))))
        # The residual is added before the modulation (official order).
        x = x.permute(0, 3, 1, 2) + residual
        scale, shift = self.film(cond)
        return shift[:, :, None, None] + x * (1 + scale[:, :, None, None])


class UVitBlock(nn.Module):
    """The official `mid_block`: a stack of ConvNeXt blocks (no down/upsampling in JanusFlow)."""

    def __init__(self, channels: int, num_blocks: int, cond_dim: int, norm_eps: float, use_bias: bool):
        super().__init__()
        self.res_blocks = nn.ModuleList(ConvNextBlock(channels, cond_dim, norm_eps, use_bias) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, cond)
        return x


class Unpatchify(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, patch_size: int, norm_eps: float, use_bias: bool):
        super().__init__()
        self.norm = RMSNorm(in_channels, norm_eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch_size**2, kernel_size=1, bias=use_bias)
        # Exports as DepthToSpace in CRD mode (PyTorch channel order); DCR would scramble latents.
        self.pixel_shuffle = nn.PixelShuffle(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.pixel_shuffle(self.unpatch_conv(x))


class ShallowUViTEncoder(nn.Module):
    """latents [B,C,h,w], timesteps [B] -> (x_emb [B,C',h/s,w/s], t_emb [B,D]). x_emb is also the skip."""

    def __init__(self, cfg: GenEncoderConfig):
        super().__init__()
        self.time_proj = Timesteps(cfg.channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(cfg.channels, cfg.hidden_size, sample_proj_bias=cfg.use_bias)
        self.in_conv = nn.Conv2d(cfg.input_channels, cfg.channels, cfg.kernel_size, stride=cfg.stride, padding=cfg.padding)
        self.mid_block = (
            UVitBlock(cfg.channels, cfg.layers_in_middle, cfg.hidden_size, cfg.norm_eps, cfg.use_bias)
            if cfg.use_mid_block
            else None
        )

    def time_embedding(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The sinusoid is computed in fp32 by diffusers (arguments reach ~1e3 rad), then cast.
        return self.time_embed(self.time_proj(timesteps.flatten()).to(dtype))

    def features(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """The latent path for a given time embedding (which depends on the step only)."""
        x_emb = self.in_conv(x)
        if self.mid_block is not None:
            x_emb = self.mid_block(x_emb, t_emb)
        return x_emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t_emb = self.time_embedding(timesteps, x.dtype)
        return self.features(x, t_emb), t_emb


class ShallowUViTDecoder(nn.Module):
    """(x [B,C,g,g], skip [B,C',g,g], t_emb [B,D]) -> velocity [B,out,g*2^u,g*2^u]."""

    def __init__(self, cfg: GenDecoderConfig):
        super().__init__()
        width = cfg.in_channels + cfg.channels
        self.mid_block = (
            UVitBlock(width, cfg.layers_in_middle, cfg.hidden_size, cfg.norm_eps, cfg.use_bias) if cfg.use_mid_block else None
        )
        self.out_convs = nn.ModuleList()
        for rank in range(cfg.upsamples):
            c_in = width if rank == 0 else cfg.channels
            c_out = cfg.out_channels if rank == cfg.upsamples - 1 else cfg.channels
            self.out_convs.append(Unpatchify(c_in, c_out, 2, cfg.norm_eps, cfg.use_bias))
        self.input_norm = RMSNorm(cfg.in_channels, cfg.norm_eps)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # Concatenation order is [normalised input, encoder skip].
        x = torch.cat([x, skip], dim=1)
        if self.mid_block is not None:
            x = self.mid_block(x, t_emb)
        for out_conv in self.out_convs:
            x = out_conv(x)
        return x
