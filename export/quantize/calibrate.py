"""Calibration: activation ranges of every linear layer from recorded feeds, and each layer's own
INT8 error on held-in samples with everything else fp32.

Activations are read from the fp32 ONNX graph itself (the layer inputs added as graph outputs),
so the ranges are those of the exact tensors the Q nodes will quantize. In LLM graphs, rows at
left-padded positions are dropped first: a padded query attends to nothing and its activations
are arbitrary (no valid row ever reads them), so they must not widen a range.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .qdq import EXTERNAL_DATA_FROM, Layer, activation_scale, fake_quant, quantize_weight, save_graph, tensor_bytes


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A session of an in-memory model; one over protobuf's 2 GB limit goes through a file with external data."""
    if tensor_bytes(model) >= EXTERNAL_DATA_FROM:
        with tempfile.TemporaryDirectory(prefix="jfexport-int8-") as folder:
            path = Path(folder) / "activations.onnx"
            save_graph(model, path)
            return _session_from(str(path))
    return _session_from(model.SerializeToString())


def _session_from(model: str | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Basic level only: the added outputs must survive, and fusions could rename what they read.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.enable_cpu_mem_arena = False  # an arena sized for every layer's activations would stay allocated
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def numpy_feeds(feeds: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
    return {n: feeds[n].numpy() for n in names}


def valid_rows(x: np.ndarray, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    """`x` as [rows, features], without the rows of left-padded positions ([B, S, F] LLM activations)."""
    mask = feeds.get("attention_mask")
    if mask is not None and x.ndim == 3 and x.shape[0] == mask.shape[0] and x.shape[1] <= mask.shape[1]:
        return x[mask[:, -x.shape[1]:].numpy().astype(bool)]
    return x.reshape(-1, x.shape[-1])


class Activations:
    """The fp32 graph with every layer's activation exposed as an output."""

    def __init__(self, path: Path, layers: list[Layer]):
        model = onnx.load(str(path))
        self.inputs = [i.name for i in model.graph.input]
        self.names = sorted({layer.activation for layer in layers})
        outputs = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                  for n in self.names if n not in outputs)
        self.session = _session(model)
        self.weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
                        if i.name in {layer.weight for layer in layers}}

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        values = self.session.run(self.names, numpy_feeds(feeds, self.inputs))
        return {n: valid_rows(v, feeds) for n, v in zip(self.names, values)}


class RangeObserver:
    """Abs max of each activation over every call observed (the `absmax` method)."""

    def __init__(self, activations: Activations):
        self.activations = activations
        self.amax: dict[str, float] = {n: 0.0 for n in activations.names}
        self.calls = 0

    def observe(self, feeds: dict[str, torch.Tensor]) -> None:
        for name, x in self.activations(feeds).items():
            if x.size:
                self.amax[name] = max(self.amax[name], float(np.abs(x).max()))
        self.calls += 1


@dataclass
class LayerError:
    layer: str
    activation: str
    rel_error: float  # ||y_int8 - y|| / ||y|| of the layer's own output, worst over the samples
    quantized: bool

    def to_json(self) -> dict:
        return {"layer": self.layer, "activation": self.activation, "rel_error": self.rel_error,
                "quantized": self.quantized}


def layer_errors(activations: Activations, layers: list[Layer], ranges: dict[str, float],
                 samples: list[dict[str, torch.Tensor]], threshold: float) -> list[LayerError]:
    """Each layer quantized alone, fed the fp32 graph's own activations; above `threshold` it stays fp32."""
    worst = {layer.node: 0.0 for layer in layers}
    deq = {}
    for layer in layers:
        q, scale = quantize_weight(activations.weights[layer.weight])
        deq[layer.weight] = q.astype(np.float32) * scale
    for feeds in samples:
        acts = activations(feeds)
        for layer in layers:
            x = acts[layer.activation]
            if not x.size:
                continue
            w = activations.weights[layer.weight]
            y = x @ w
            yq = fake_quant(x, activation_scale(ranges[layer.activation])) @ deq[layer.weight]
            err = float(np.linalg.norm(yq - y) / max(float(np.linalg.norm(y)), 1e-12))
            err = err if math.isfinite(err) else math.inf  # max() would skip a NaN
            worst[layer.node] = max(worst[layer.node], err)
    return [LayerError(layer.name, layer.activation, worst[layer.node], worst[layer.node] <= threshold)
            for layer in layers]
