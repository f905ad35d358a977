"""An FP8 (e4m3) option for the LLM's matrix products: an experiment, not a default.

Weights are quantised once per output channel, activations per row (per token) at every call,
both to float8_e4m3fn with fp32 scales; the product is `torch._scaled_mm` with row-wise scales
on GPUs that have FP8 (compute capability 8.9+: L4/L40, H100/H200) for bf16 models. Elsewhere
(CPU, fp32 models, older GPUs) the same quantised operands are multiplied in fp32 after
dequantisation: the same rounding of the inputs, so its quality cost can be measured on CPU,
but no speed-up. Only the decoder layers' projections are replaced; the embeddings, the LM head,
norms, attention and the generation heads keep the model's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M,K] -> (FP8 values [M,K], fp32 scales [M,1]) with x ~= values * scales."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """A bias-free nn.Linear with FP8 weights (per output channel) and FP8 activations (per row);
    the output has the input's dtype."""

    weight_bits: torch.Tensor  # registered buffers, typed for the checker (Module.__getattr__ is untyped)
    scale_bits: torch.Tensor
    in_features: int
    out_features: int

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("FP8Linear replaces bias-free projections only")
        values, scale = quantize_rows(linear.weight.detach())
        # Stored as integer bits: Module.to(dtype) casts every floating-point buffer (FP8 counts as
        # one) and would turn the weights into bf16 and round the fp32 scales.
        self.register_buffer("weight_bits", values.view(torch.uint8))
        self.register_buffer("scale_bits", scale.t().contiguous().view(torch.int32))  # [1,N]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._dequantized: torch.Tensor | None = None

    @property
    def weight_fp8(self) -> torch.Tensor:
        return self.weight_bits.view(FP8)

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        values, scale = quantize_rows(flat)
        if scaled_mm_available(x.device, x.dtype):
            out = torch._scaled_mm(values, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype)
        else:
            dequantized = self._dequantized
            if dequantized is None or dequantized.device != x.device:
                dequantized = self._dequantized = (self.weight_fp8.float() * self.weight_scale.t()).t().contiguous()
            out = ((values.float() * scale) @ dequantized).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


@contextmanager
def fp8_matmuls(model) -> Iterator[int]:
    """Within the block, the decoder layers' projections of `model` (a JanusFlowModel) are
    FP8Linear; yields how many were replaced, and puts the originals back on exit. Captured CUDA
    graphs of the fast paths hold the modules they saw: use a runtime made inside the block."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for layer in model.language_model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, FP8Linear(child))
                    swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
