"""Which backend a build or a runtime uses, and why (printed to the user)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from jfexport.defaults import BACKENDS, ENGINE_BACKENDS  # noqa: F401 - re-exported: where callers look for them

from .errors import BackendUnavailable

TENSORRT_INSTALL = (
    "TensorRT is not installed. Install it on a machine with an NVIDIA GPU from NVIDIA's package index "
    "(`pip install -e .[tensorrt]`, which pulls `tensorrt` and its CUDA libraries from pypi.nvidia.com), "
    "or run inside an NGC TensorRT container (nvcr.io/nvidia/tensorrt)."
)


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    reason: str


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def choose_backend(requested: str) -> BackendChoice:
    if requested not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {requested!r} (known: {', '.join(BACKENDS)})")
    has_trt, has_gpu = tensorrt_available(), torch.cuda.is_available()
    if requested == "tensorrt":
        if not has_trt:
            raise BackendUnavailable(TENSORRT_INSTALL)
        if not has_gpu:
            raise BackendUnavailable("TensorRT needs a CUDA GPU and none is visible (torch.cuda.is_available() is False)")
        return BackendChoice("tensorrt", "requested")
    if requested != "auto":
        return BackendChoice(requested, "requested")
    if has_trt and has_gpu:
        return BackendChoice("tensorrt", f"TensorRT and a GPU ({torch.cuda.get_device_name(0)}) are present")
    why = "TensorRT is not installed" if not has_trt else "no CUDA GPU is visible"
    return BackendChoice("onnxruntime", f"{why}; using ONNX Runtime ({'CUDA' if has_gpu and ort_has_cuda() else 'CPU'})")


def ort_has_cuda() -> bool:
    """Whether this onnxruntime can run on a GPU (onnxruntime-gpu); the plain wheel runs on the CPU only."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
