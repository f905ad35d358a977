"""The `tensorrt` backend, in the style of TensorRT's demoDiffusion `Engine`: one deserialised
engine per graph, output buffers preallocated at the profile maxima, `set_tensor_address` and
`execute_async_v3` on the current torch stream, and activation memory shared by all engines
(they run one after another on one stream, so one scratch buffer of the largest size serves all).

The K/V cache contract (manifest format 2, docs/kv_cache.md) on TensorRT: `llm_decode`'s `past.*`
inputs are bound by address to the cache's own memory (a contiguous [rows, Hkv, C, Dh] view of
one buffer allocated at load: `set_tensor_address` on it, no copy), and its `new.*` outputs to the
cache's staging buffers [rows, Hkv, T, Dh], from which the runtime writes each row's columns into
the cache. Assumed: the engine reads its inputs and never writes them (TensorRT's contract for
input tensors), inputs stay valid until the stream has run the enqueued work (the runtime
synchronises before it writes the cache again), and output addresses do not alias inputs. Every
output gets an address (TensorRT requires it); those not asked for (`names`) go to this engine's
own buffers and are not returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from jfexport.core.manifest import GraphRecord
from jfexport.core.profiles import optimization_profiles, select_profile

from ..errors import RuntimeFailure
from ..trt_plan import gpu_compute_capability, stale_engine_reason


class _SharedActivations:
    """One device buffer for every engine's activations, grown to the largest request."""

    buffer: torch.Tensor | None = None

    @classmethod
    def get(cls, size: int) -> torch.Tensor:
        if cls.buffer is None or cls.buffer.numel() < size:
            cls.buffer = torch.empty(size, dtype=torch.uint8, device="cuda")
        return cls.buffer


class TrtEngine:
    device = torch.device("cuda")

    def __init__(self, name: str, path: Path, profiles: list[dict]):
        import tensorrt as trt

        self.name = name
        self.path = path
        self._trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeFailure(f"{name}: TensorRT could not deserialise {path}")
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if hasattr(self.engine, "create_runtime_config"):  # TensorRT 11
            config = self.engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(strategy)
            self.context = self.engine.create_execution_context(config)
        else:  # TensorRT 10
            self.context = self.engine.create_execution_context(strategy)
        self.profiles = profiles
        self._profile = -1
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._out_buffers: dict[str, torch.Tensor] = {}

    @classmethod
    def from_manifest_entry(cls, name: str, folder: Path, entry: GraphRecord, precision: str) -> "TrtEngine":
        """The engine the build attached to the graph's file served at `precision` (the one the
        loader checked)."""
        import tensorrt as trt

        engine = entry.served(precision).engine
        if engine is None:
            raise RuntimeFailure(f"{name}: no TensorRT engine in this build (rebuild with --backend tensorrt)")
        reason = stale_engine_reason(engine, trt.__version__, gpu_compute_capability())
        if reason:
            raise RuntimeFailure(f"{name}: engine {engine.file} {reason}; rebuild with `jfexport build --backend tensorrt`")
        return cls(name, folder / engine.file, optimization_profiles(name, entry.spec))

    def _output(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A view of this output's preallocated flat buffer (grown once if a larger shape comes)."""
        numel = 1
        for d in shape:
            numel *= d
        buf = self._out_buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=self.dtypes[name], device="cuda")
            self._out_buffers[name] = buf
        return buf[:numel].view(shape)

    def run(self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor] | None = None,
            names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        stream = torch.cuda.current_stream()
        inputs = {n: feeds[n].to(device="cuda", dtype=self.dtypes[n]).contiguous() for n in self.inputs}
        if self.profiles:
            index = select_profile(self.profiles, {n: tuple(t.shape) for n, t in inputs.items()})
            if index != self._profile:
                self.context.set_optimization_profile_async(index, stream.cuda_stream)
                self._profile = index
        for n, t in inputs.items():
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
        size = self.engine.device_memory_size_v2
        self.context.set_device_memory(_SharedActivations.get(size).data_ptr(), size)
        result: dict[str, torch.Tensor] = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            given = (outputs or {}).get(n)
            out = given if given is not None and tuple(given.shape) == shape and given.is_contiguous() else self._output(n, shape)
            self.context.set_tensor_address(n, out.data_ptr())
            if names is None or n in names:
                result[n] = out
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeFailure(f"{self.name}: TensorRT execution failed")
        return result


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32,
             trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]
