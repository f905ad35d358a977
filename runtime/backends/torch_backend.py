"""The `torch` backend: the reference graph modules behind the engine interface."""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, cast

import torch
from jfexport.reference.bundle import ModelBundle
from jfexport.reference.graphs import GRAPH_NAMES, build_graph


def exact_fp32(dtype: torch.dtype):
    """A context in which fp32 work stays fp32: cuDNN would otherwise run convolutions in TF32
    (PyTorch's default), ~1e-3 relative off the reference. Other cuDNN settings are kept."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=dtype != torch.float32)


class GraphModule(Protocol):
    """A graph of `reference.graphs`: its contract's input and output names, tensors in and out."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


class TorchEngine:
    def __init__(self, name: str, module: GraphModule, dtype: torch.dtype, device: torch.device):
        self.name = name
        self.module = module
        self.dtype = dtype
        self.device = device

    def run(self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor] | None = None,
            names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        args = []
        for name in self.module.input_names:
            x = feeds[name].to(self.device)
            args.append(x.to(self.dtype) if x.is_floating_point() else x)
        with torch.inference_mode(), exact_fp32(self.dtype):
            results = self.module(*args)
        return {n: r for n, r in zip(self.module.output_names, results) if names is None or n in names}


def torch_engines(bundle: ModelBundle, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> dict[str, TorchEngine]:
    device = torch.device(device)
    model = bundle.model.to(device=device, dtype=dtype)
    names = [g for g in GRAPH_NAMES if g != "vae_decoder" or bundle.vae is not None]
    if bundle.vae is not None and (bundle.vae.dtype != dtype or bundle.vae.device != device):
        bundle.vae.to(device=device, dtype=dtype)
    # Every graph module of `build_graph` names its contract's inputs and outputs.
    return {g: TorchEngine(g, cast(GraphModule, build_graph(g, model, bundle.vae)), dtype, device) for g in names}
