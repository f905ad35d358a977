"""The `onnxruntime` backend: one InferenceSession per graph.

CPU: tensors cross as zero-copy numpy views. Where the caller hands over output buffers or asks for
some outputs only (the K/V cache's decode step, the Euler step), the call goes through IO binding:
inputs are bound over the caller's memory (the cache's contiguous `past` views, never copied),
outputs written straight into the caller's buffers (allocated once by the cache), and outputs
not asked for are not fetched. CUDA (onnxruntime-gpu): IO binding on torch device buffers
always, so nothing is copied between host and device per call. A GPU machine whose
onnxruntime has no CUDA provider (the plain `onnxruntime` wheel) runs the engines on the CPU and
says so once, rather than refusing to serve.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch

from ..backend_choice import ort_has_cuda
from ..errors import RuntimeFailure

log = logging.getLogger(__name__)

_ORT_TO_TORCH = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool,
}


def ort_device(device: str) -> str:
    """The device ONNX Runtime can run on for `device`: "cpu" (with a warning) where CUDA was asked for and
    this onnxruntime has no CUDA provider."""
    if torch.device(device).type == "cuda" and not ort_has_cuda():
        log.warning("onnxruntime %s has no CUDA provider here: running the engines on the CPU "
                    "(install the `gpu` extra, onnxruntime-gpu, to run them on the GPU)", ort.__version__)
        return "cpu"
    return device


class OrtEngine:
    def __init__(self, name: str, path: str | Path, device: str = "cpu", threads: int | None = None):
        self.name = name
        self.device = torch.device(ort_device(device))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # ORT's idle worker threads spin after each run, stealing the cores from the torch work
        # between engine calls (measured on 2 cores: the image-embedding splice took 13 ms instead of
        # 0.05, time to first token 15.5 ms instead of 2.9). Back-to-back engine calls pay a small wake-up.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=_providers(self.device.type))
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise RuntimeFailure(f"{name}: cannot load {path} ({e})") from None
        self.input_dtypes = {i.name: _ORT_TO_TORCH[i.type] for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _inputs(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.input_dtypes if n not in feeds]
        if missing:
            raise RuntimeFailure(f"{self.name}: missing input(s) {missing}")
        return {n: feeds[n].to(device=self.device, dtype=dt).contiguous() for n, dt in self.input_dtypes.items()}

    def run(self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor] | None = None,
            names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        inputs = self._inputs(feeds)
        wanted = self.output_names if names is None else [n for n in self.output_names if n in names]
        if self.device.type == "cpu" and not outputs and names is None:
            results = self.session.run(self.output_names, {n: t.numpy() for n, t in inputs.items()})
            return {n: torch.from_numpy(np.ascontiguousarray(r)) for n, r in zip(self.output_names, results)}
        return self._run_bound(inputs, outputs or {}, wanted)

    def _run_bound(self, inputs: dict[str, torch.Tensor], outputs: Mapping[str, torch.Tensor],
                   wanted: list[str]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for name, t in inputs.items():
            if kind == "cpu":
                # An OrtValue over the tensor's own memory: the K/V past is read where the cache keeps it.
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(t.numpy()))
            else:
                binding.bind_input(name, kind, index, _np_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        given = {n: b for n, b in outputs.items() if n in wanted and b.is_contiguous() and b.device == self.device}
        for name in wanted:
            buf = given.get(name)
            if buf is not None:
                binding.bind_output(name, kind, index, _np_dtype(buf.dtype), tuple(buf.shape), buf.data_ptr())
            else:
                binding.bind_output(name, kind, index)
        self.session.run_with_iobinding(binding)
        produced = dict(zip(wanted, binding.get_outputs()))
        result: dict[str, torch.Tensor] = {}
        for name in wanted:
            if name in given:
                result[name] = given[name]
            elif kind == "cpu":
                result[name] = torch.from_numpy(produced[name].numpy())
            else:
                result[name] = torch.from_dlpack(produced[name])  # OrtValue implements __dlpack__
        return result


def _providers(device_type: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device_type == "cuda" else ["CPUExecutionProvider"]


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
            torch.bool: np.bool_}[dtype]
