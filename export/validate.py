"""Parity of an exported graph with its PyTorch module, in ONNX Runtime (optimum-style check).

Reference outputs always come from the fp32 module, so fp16 graphs are measured against the
fp32 function. LLM outputs at left-padded positions carry no meaning and are excluded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from jfexport.core.graph_spec import GraphSpec

from .onnx_export import typed_feeds
from .samples import meaningful, sample_inputs

FP32_ATOL = 1e-4  # relative to max(1, |reference|max) of each output
FP16_RTOL = 1e-2  # max abs error / |reference|max


@dataclass
class Case:
    dims: dict[str, int]
    feeds: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


@dataclass
class Parity:
    max_abs: float
    max_rel: float  # max abs error / |reference|max, over outputs
    worst_output: str
    shapes: list[dict[str, int]]
    ok: bool

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def reference_cases(module: nn.Module, spec: GraphSpec, dims_list: list[dict[str, int]]) -> list[Case]:
    cases = []
    for i, dims in enumerate(dims_list):
        feeds = sample_inputs(spec, dims, seed=100 + i)
        outs = module(*[feeds[t.name] for t in spec.inputs])
        cases.append(Case(dims, feeds, {t.name: o.float() for t, o in zip(spec.outputs, outs)}))
    return cases


def validation_dims(spec: GraphSpec) -> list[dict[str, int]]:
    """Export-time shapes: the smallest (1s, past 0), the export sample and the profile optimum."""
    out: list[dict[str, int]] = []
    for which in ("min", "sample", "opt"):
        values = spec.dim_values(which)
        if values not in out:
            out.append(values)
    return out


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(path: Path, spec: GraphSpec, precision: str, cases: list[Case]) -> Parity:
    """Run the graph on every case; ok when the worst output is within the precision's bound."""
    sess = session(path)
    typed = spec.typed(precision)
    worst_abs, worst_rel, worst_metric, worst = 0.0, 0.0, 0.0, ""
    for case in cases:
        feeds = {k: v.numpy() for k, v in typed_feeds(typed, case.feeds).items()}
        results = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        for name, ref in case.outputs.items():
            got = meaningful(name, torch.from_numpy(np.asarray(results[name], dtype=np.float32)), case.feeds)
            ref = meaningful(name, ref, case.feeds)
            if ref.numel() == 0:
                continue
            if not torch.isfinite(got).all():
                return Parity(float("inf"), float("inf"), name, [c.dims for c in cases], False)
            err = (got - ref).abs().max().item()
            scale = ref.abs().max().item()
            rel = err / max(scale, 1e-12)
            metric = err / max(1.0, scale) / FP32_ATOL if precision == "fp32" else rel / FP16_RTOL
            if metric > worst_metric:
                worst_metric, worst = metric, name
            worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, rel)
    return Parity(worst_abs, worst_rel, worst, [c.dims for c in cases], worst_metric <= 1.0)
