"""TensorRT engine files, without TensorRT: their names, whether one is current, and why a stale one
must not be deserialised here (engines are tied to the TensorRT version and the GPU).
"""

from __future__ import annotations

from jfexport.core.manifest import EngineRecord, GraphFile


def engine_file_name(graph: str, precision: str, trt_version: str, compute_capability: str) -> str:
    """Engines are tied to the TensorRT version and the GPU they were built on: both are in the name."""
    return f"{graph}.{precision}.trt{trt_version}.sm{compute_capability.replace('.', '')}.engine"


def engine_is_current(info: GraphFile, onnx_sha256: str, trt_version: str, compute_capability: str) -> bool:
    engine = info.engine
    return engine is not None and engine.onnx_sha256 == onnx_sha256 and engine.tensorrt == trt_version \
        and engine.compute_capability == compute_capability


def gpu_compute_capability() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def stale_engine_reason(engine: EngineRecord, trt_version: str, compute_capability: str) -> str | None:
    """Why an engine must not be deserialised here, or None when it fits."""
    if engine.tensorrt != trt_version:
        return f"built by TensorRT {engine.tensorrt}, this is TensorRT {trt_version}"
    if engine.compute_capability != compute_capability:
        return f"built for compute capability {engine.compute_capability}, this GPU is {compute_capability}"
    return None
