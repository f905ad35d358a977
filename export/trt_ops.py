"""TensorRT operator check without TensorRT: every node of a graph against the ONNX-TensorRT
support matrix kept in data/onnx_trt_ops.json (its source is recorded there)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnx

from jfexport.core.errors import UserError

DATA = Path(__file__).parent / "data" / "onnx_trt_ops.json"
_ONNX_TO_TRT: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT8: "INT8",
}


class UnsupportedOperator(UserError):
    pass


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    problem: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}): {self.problem}"


@lru_cache(maxsize=1)
def support_matrix() -> dict:
    return json.loads(DATA.read_text())


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {}
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def check_model(model: onnx.ModelProto) -> list[Finding]:
    """Findings for nodes TensorRT cannot parse: unknown op, unsupported dtype, opset, DepthToSpace mode."""
    matrix = support_matrix()
    ops = matrix["operators"]
    findings: list[Finding] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not matrix["opset_min"] <= opset <= matrix["opset_max"]:
        findings.append(Finding("<model>", "opset", f"opset {opset} outside {matrix['opset_min']}..{matrix['opset_max']}"))
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False) if model.ByteSize() < 2**31 - 1 else model
    types = _value_types(inferred)
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):
            findings.append(Finding(name, f"{node.domain}::{node.op_type}", "custom domain (TensorRT would need a plugin)"))
            continue
        entry = ops.get(node.op_type)
        if entry is None or not entry["supported"]:
            findings.append(Finding(name, node.op_type, "not supported by the ONNX-TensorRT parser"))
            continue
        # The matrix lists the types of an op's data input (its first input).
        data_type = _ONNX_TO_TRT.get(types.get(node.input[0], 0)) if node.input and node.input[0] else None
        if data_type is not None and data_type not in entry["types"]:
            findings.append(Finding(name, node.op_type, f"input {node.input[0]!r} is {data_type}, supported: {entry['types']}"))
        if node.op_type == "DepthToSpace":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "DCR")
            if mode != "CRD":
                # PyTorch's PixelShuffle is CRD; a DCR node would scramble the latents (JANUSFLOW.md pitfall 11).
                findings.append(Finding(name, node.op_type, f"mode {mode}, expected CRD (PixelShuffle)"))
    return findings + check_explicit_quantization(model)


def _attr(node: onnx.NodeProto, key: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == key), default)


def check_explicit_quantization(model: onnx.ModelProto) -> list[Finding]:
    """Q/DQ placement TensorRT's explicit quantization accepts (TensorRT developer guide, "Explicit
    Quantization"): symmetric INT8 (every zero point an int8 0), activations per tensor (scalar scale),
    weights an INT8 initializer under a DequantizeLinear with one scale per output channel (axis 1 of a
    [K, N] MatMul weight), and a quantized MatMul quantized on both inputs (else TensorRT runs it in float)."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    findings: list[Finding] = []
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if len(node.input) < 3 or node.input[2] not in inits:
                findings.append(Finding(name, node.op_type, "no constant zero point (TensorRT needs a zero point of 0)"))
                continue
            zero = onnx.numpy_helper.to_array(inits[node.input[2]])
            if inits[node.input[2]].data_type != onnx.TensorProto.INT8 or zero.any():
                findings.append(Finding(name, node.op_type, "zero point not an int8 0 (TensorRT INT8 is symmetric)"))
            scale = inits.get(node.input[1])
            if scale is None:
                findings.append(Finding(name, node.op_type, "scale is not a constant"))
                continue
            weight = inits.get(node.input[0])
            if node.op_type == "DequantizeLinear" and weight is not None:
                axis = _attr(node, "axis", 1)
                if len(weight.dims) != 2 or axis != 1 or list(scale.dims) != [weight.dims[1]]:
                    findings.append(Finding(name, node.op_type, f"weight {list(weight.dims)} scale {list(scale.dims)} "
                                                                f"axis {axis}: expected one scale per output channel"))
            elif len(scale.dims) != 0:
                findings.append(Finding(name, node.op_type, f"activation scale {list(scale.dims)}: expected per tensor"))
            if node.op_type == "DequantizeLinear" and weight is None and producer.get(node.input[0]) is None:
                findings.append(Finding(name, node.op_type, "dequantizes a graph input"))
        elif node.op_type == "MatMul":
            fed = [producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input]
            if any(fed) and not all(fed):
                findings.append(Finding(name, node.op_type, "quantized on one input only (TensorRT would run it in float)"))
    return findings


def check_file(path: str | Path) -> list[Finding]:
    return check_model(onnx.load(str(path), load_external_data=False))
