"""The Q/DQ pass over an exported fp32 graph: which MatMuls are linear layers, and their INT8 form.

A linear layer is a MatMul whose second input is a 2-D fp32 initializer W [K, N] (the dynamo
exporter folds nn.Linear's transpose into the initializer). Its INT8 form, as TensorRT's explicit
quantization wants it and ONNX Runtime's CPU provider fuses into MatMulIntegerToFloat:

    x --QuantizeLinear(s_x, 0)--DequantizeLinear(s_x, 0)--+
                                                           MatMul --> y (fp32)
    W_int8 --DequantizeLinear(s_w[N], 0, axis=1)----------+

Weights are symmetric per output channel (axis 1 of [K, N]) within +-WEIGHT_MAX = 64, not the full
int8 range: ONNX Runtime's x86 kernels without VNNI sum pairs of u8 x s8 products in a saturating
int16, which full-range weights overflow (runtime/int8_arithmetic.py measures it; the manifest
records the bound). Activations are symmetric per tensor, full range; every zero point an int8 0.
Each layer gets its own Q/DQ pair, also where several layers read one activation (q/k/v projections,
gate/up) with one scale: ONNX Runtime fuses the pair into the MatMul (MatMulIntegerToFloat) only
when the Q and the DQ serve that one MatMul. A shared pair leaves those layers unfused, dequantizing
their weights on every call (measured: llm_decode of the `small` preset 5x slower at one token), and
ORT's common-subexpression elimination merges identical Q nodes into a shared pair: so the k-th
reader's scale is the activation's scale moved by k ulps (a relative change of ~1e-7 per reader, far
below INT8's 1/254 step).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from jfexport.runtime.int8_arithmetic import WEIGHT_MAX
from onnx import TensorProto, helper, numpy_helper

INT8_MAX = 127  # activations: the full symmetric int8 range
# Graphs whose tensors pass this are written with ONNX external data (protobuf's 2 GB limit), as the
# exporter does (export/onnx_export.py): the full-size LLM graphs stay above it even in INT8 (fp32 LM head).
EXTERNAL_DATA_FROM = 2**31 - (64 << 20)


@dataclass(frozen=True)
class Layer:
    name: str  # the module path, e.g. language_model.model.layers.0.mlp.down_proj
    node: str  # the MatMul node
    activation: str  # its data input
    weight: str  # its [K, N] initializer


def _module_name(node: onnx.NodeProto) -> str:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            if len(scopes) >= 2:
                return scopes[-2].removeprefix("model.")
    return node.name


def linear_layers(model: onnx.ModelProto) -> list[Layer]:
    weights = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2}
    return [Layer(_module_name(n), n.name, n.input[0], n.input[1])
            for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def activation_scale(amax: float) -> np.float32:
    # A range of 0 (a layer never fed anything but zeros) still needs a positive scale.
    return np.float32(max(float(amax), 1e-8) / INT8_MAX)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights within +-WEIGHT_MAX, fp32 scale per output channel) of a [K, N] weight."""
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / WEIGHT_MAX, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8), scale


def fake_quant(x: np.ndarray, scale: np.float32) -> np.ndarray:
    """What QuantizeLinear then DequantizeLinear compute (round half to even, saturate to int8)."""
    return (np.clip(np.rint(x / scale), -128, INT8_MAX) * scale).astype(np.float32)


def insert_qdq(model: onnx.ModelProto, layers: list[Layer], ranges: dict[str, float]) -> onnx.ModelProto:
    """A copy of `model` with `layers` in INT8; `ranges` holds the abs max of each layer's activation."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    by_node = {layer.node: layer for layer in layers}
    new_inits: list[onnx.TensorProto] = []
    weight_nodes: list[onnx.NodeProto] = []
    dequantized: dict[str, str] = {}  # fp32 weight -> its DequantizeLinear output
    for layer in layers:
        if layer.weight not in dequantized:
            q, scale = quantize_weight(numpy_helper.to_array(inits[layer.weight]))
            base = f"{layer.weight}_int8"
            new_inits += [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, f"{base}_scale"),
                          numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zero")]
            dequantized[layer.weight] = f"{base}_dq"
            weight_nodes.append(helper.make_node("DequantizeLinear", [base, f"{base}_scale", f"{base}_zero"],
                                                 [f"{base}_dq"], name=f"{base}_DequantizeLinear", axis=1))
    readers: dict[str, int] = {}
    for layer in layers:
        k = readers.get(layer.activation, 0)
        readers[layer.activation] = k + 1
        act_scale = activation_scale(ranges[layer.activation])
        for _ in range(k):
            act_scale = np.nextafter(act_scale, np.float32(np.inf))
        base = f"{layer.activation}_{layer.node}"
        new_inits += [numpy_helper.from_array(np.array(act_scale, np.float32), f"{base}_scale"),
                      numpy_helper.from_array(np.array(0, np.int8), f"{base}_zero")]
    nodes: list[onnx.NodeProto] = list(weight_nodes)
    for node in graph.node:
        quantized = by_node.get(node.name)
        if quantized is not None:
            base = f"{quantized.activation}_{quantized.node}"
            scale_name, zero_name, q_name, dq = f"{base}_scale", f"{base}_zero", f"{base}_q", f"{base}_dq"
            nodes += [helper.make_node("QuantizeLinear", [quantized.activation, scale_name, zero_name], [q_name],
                                       name=f"{q_name}_QuantizeLinear"),
                      helper.make_node("DequantizeLinear", [q_name, scale_name, zero_name], [dq], name=f"{dq}_DequantizeLinear")]
            node.input[0] = dq
            node.input[1] = dequantized[quantized.weight]
        nodes.append(node)
    still_read = {i for n in nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name in still_read]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new_inits])
    return out


def tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(i.raw_data) for i in model.graph.initializer)


def save_graph(model: onnx.ModelProto, path: Path, external_from: int = EXTERNAL_DATA_FROM) -> list[str]:
    """Write `model` to `path`, its tensors to `<name>.data` beside it when they pass `external_from`;
    returns the external-data file names written."""
    if tensor_bytes(model) < external_from:
        onnx.save(model, str(path))
        return []
    data = f"{path.name}.data"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
              size_threshold=1024)
    return [data]
