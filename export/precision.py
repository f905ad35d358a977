"""fp16 typing with fp32 islands: the model is cast to fp16, then the numerically fragile pieces
are made to compute in fp32 so the exported graph carries explicit Casts around them.

Islands: RMSNorm statistics (the reference RMSNorm already upcasts), LayerNorm (SigLIP), softmax
(the explicit-softmax attention paths upcast), the GlobalResponseNorm spatial L2 reduction, and
the sinusoidal time embedding (computed from fp32 timesteps). The VAE is never typed fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jfexport.reference.modules.janusflow import JanusFlowModel
from jfexport.reference.modules.uvit import GlobalResponseNorm
from torch import nn
from transformers import AttentionInterface


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 on fp16 activations; its parameters stay fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class FP32StatsGRN(GlobalResponseNorm):
    """GRN whose spatial L2 norm runs in fp32: 576 squares of typical activations overflow fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x.float(), ord=2, dim=(1, 2), keepdim=True)
        nx = (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.bias + (self.weight * nx + 1) * x


def _swap(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.LayerNorm) and not isinstance(child, FP32LayerNorm):
            new = FP32LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine)
            new.load_state_dict({k: v.float() for k, v in child.state_dict().items()})
            setattr(module, name, new)
        elif isinstance(child, GlobalResponseNorm) and not isinstance(child, FP32StatsGRN):
            grn = FP32StatsGRN(child.weight.shape[-1]).to(child.weight.dtype)
            grn.load_state_dict(child.state_dict())
            setattr(module, name, grn)
        else:
            _swap(child)


@torch.no_grad()
def to_fp16_(model: JanusFlowModel) -> JanusFlowModel:
    """Cast `model` to fp16 in place and install the fp32 islands."""
    model.half()
    _swap(model)
    return model


FP32_SOFTMAX_ATTENTION = "jfexport_fp32_softmax"


def _fp32_softmax_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function with the softmax upcast explicitly.

    transformers' eager path writes softmax(x, dtype=float32), which exports as an fp16 Softmax
    followed by a Cast; an explicit cast of the scores keeps the softmax itself in fp32.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(FP32_SOFTMAX_ATTENTION, _fp32_softmax_attention)


def use_explicit_softmax(model: JanusFlowModel) -> None:
    """Make every attention spell its softmax out in fp32 (what engines should compute)."""
    model.attention = "math"
    model.vision_und_enc_model.vision_tower.config._attn_implementation = FP32_SOFTMAX_ATTENTION
