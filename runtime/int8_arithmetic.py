"""Whether this CPU's ONNX Runtime computes an INT8 Q/DQ MatMul exactly, and which CPU this is.

ONNX Runtime's CPU provider fuses a Q/DQ MatMul into an integer kernel (MatMulIntegerToFloat) whose
arithmetic depends on the instruction set. With VNNI (AVX-512 VNNI, AVX-VNNI), AMX or ARM's dot
product, u8/s8 products accumulate straight into int32: exact. Without them (AVX2, AVX-512 without
VNNI) x86 computes s8 x s8 as u8 x s8 with `vpmaddubsw`, which sums pairs of products into a
*saturating int16*: with activations at up to 255 (s8 shifted to u8) and full-range weights (127),
2 x 255 x 127 = 64770 overflows 32767. Measured on an AVX2-only AMD EPYC, a 256 x 64 MatMul of
extreme operands is 45% (relative RMS) off exact integer arithmetic, and a trained model's int8
build 24% off in its final latent. Weights within +-64 keep every pair sum within
2 x 255 x 64 = 32640: exact on every kernel (ORT's quantization docs name the same remedy).

`matmul_error` is the check: one Q/DQ MatMul, built in the placement the build writes, with
extreme operands, run fused by ONNX Runtime and compared with exact integer arithmetic. The build
records its result and the CPU (`describe_cpu`) in the manifest; the runtime runs it again before
serving INT8 engines (a few milliseconds), so engines are never served on a CPU that computes them
differently from the one they were checked on.

Imports no model code.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import numpy as np

# Largest |weight| of the INT8 scheme jfexport builds (symmetric per output channel): see above.
WEIGHT_MAX = 64
# The scheme before the bound existed: full-range weights (format 2 builds without an `int8` record).
LEGACY_WEIGHT_MAX = 127
# `matmul_error` above which a CPU's INT8 arithmetic is not exact. Exact kernels measure 0.0 (products of
# integers summed in int32, then scaled by 1.0); saturation measures 0.45 with full-range weights.
MATMUL_TOLERANCE = 1e-6

# /proc/cpuinfo flags that decide which integer kernel ONNX Runtime (MLAS) runs.
_X86_INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
_ARM_INT8_FLAGS = ("asimddp", "i8mm")


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; empty where the file does not exist (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "", set()
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def int8_isa(machine: str, flags: set[str]) -> str:
    """The integer-kernel family ONNX Runtime picks on a CPU with these flags."""
    if machine in ("x86_64", "amd64", "i386", "i686"):
        if "amx_int8" in flags:
            return "amx"
        if "avx512_vnni" in flags:
            return "avx512-vnni"
        if "avx_vnni" in flags:
            return "avx-vnni"
        if "avx512bw" in flags:
            return "avx512"
        return "avx2" if "avx2" in flags else "sse"
    if machine in ("aarch64", "arm64"):
        return "arm64-dotprod" if "asimddp" in flags else "arm64"
    return machine or "unknown"


def describe_cpu() -> dict:
    """This CPU as a manifest records it: machine, model name, the int8 kernel family, and its flags."""
    machine = platform.machine().lower()
    model, flags = _cpuinfo()
    relevant = _ARM_INT8_FLAGS if machine in ("aarch64", "arm64") else _X86_INT8_FLAGS
    return {"machine": machine, "model": model or platform.processor() or "unknown",
            "isa": int8_isa(machine, flags), "flags": sorted(f for f in relevant if f in flags)}


def cpu_name(cpu: dict) -> str:
    """One line naming a recorded CPU, for messages: 'AMD EPYC (x86_64, avx2)'."""
    return f"{cpu.get('model', 'unknown')} ({cpu.get('machine', '?')}, {cpu.get('isa', '?')})"


def _probe_model(w: np.ndarray) -> bytes:
    """One Q/DQ MatMul over the int8 weights `w` [K, N], unit scales: the placement the build writes."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(n, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_dq"], axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    graph = helper.make_graph(nodes, "int8_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


@lru_cache(maxsize=None)
def matmul_error(weight_max: int, k: int = 256, n: int = 64) -> float:
    """Relative RMS error of ONNX Runtime's fused INT8 MatMul against exact integer arithmetic, on this CPU,
    with weights at +-`weight_max` and activations at the int8 extremes (-128, 127), at 1 and 8 rows (ORT
    runs a matrix-vector kernel for one row and a packed GEMM for more)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as served: fused kernels
    options.intra_op_num_threads = 1
    rng = np.random.default_rng(0)
    w = (rng.choice([-1, 1], size=(k, n)) * weight_max).astype(np.int8)
    session = ort.InferenceSession(_probe_model(w), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for rows in (1, 8):
        # Activations at the int8 extremes: after the s8 -> u8 shift each is 0 or 255.
        x = rng.choice([-128.0, 127.0], size=(rows, k)).astype(np.float32)
        got = session.run(None, {"x": x})[0].astype(np.float64)
        exact = (x.astype(np.int64) @ w.astype(np.int64)).astype(np.float64)
        worst = max(worst, float(np.sqrt(((got - exact) ** 2).mean() / max((exact ** 2).mean(), 1.0))))
    return worst
