"""TensorRT planning that needs no TensorRT, shared by the build and the runtime: optimisation
profiles from the graph specs, engine file names, staleness, prompt buckets, buffer sizes.

`llm_decode` gets two profiles rather than one wide one: understanding decodes T=1 token over a
growing past, generation feeds T=1+N step tokens over the fixed prompt past. One profile spanning
both would be tuned for neither (TensorRT picks kernels per profile at its `opt` shape), and two
separate engines would hold the LLM weights twice.
"""

from __future__ import annotations

from jfexport.core.manifest import DimRange, EngineRecord, GraphFile, SpecRecord

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def _resolve(shape: tuple[int | str, ...], values: dict[str, int]) -> Shape:
    return tuple(d if isinstance(d, int) else sum(values[p.strip()] for p in d.split("+")) for d in shape)


def _profile(spec: SpecRecord, ranges: dict[str, DimRange]) -> Profile:
    out: Profile = {}
    for t in spec.inputs:
        out[t.name] = tuple(_resolve(t.shape, {k: getattr(r, w) for k, r in ranges.items()}) for w in ("min", "opt", "max"))
    return out


def optimization_profiles(name: str, spec: SpecRecord) -> list[Profile]:
    dims = dict(spec.dims)
    if name != "llm_decode":
        return [_profile(spec, dims)]
    t_max, p_max = dims["T"].max, dims["P"].max
    understanding = dict(dims, T=DimRange(1, 1, 1), P=DimRange(0, dims["P"].opt, p_max))
    # Generation: the past is the prompt (>= 1 token, BOS), and past + step tokens fit the sequence.
    gen_past = DimRange(1, min(dims["P"].opt, p_max - t_max), p_max - t_max + 1)
    generation = dict(dims, T=DimRange(t_max, t_max, t_max), P=gen_past)
    return [_profile(spec, understanding), _profile(spec, generation)]


def select_profile(profiles: list[Profile], shapes: dict[str, Shape]) -> int:
    """Index of the first profile whose ranges contain every input shape."""
    for i, profile in enumerate(profiles):
        if all(all(lo <= s <= hi for s, lo, hi in zip(shapes[n], mn, mx)) for n, (mn, _, mx) in profile.items()):
            return i
    raise ValueError(f"no optimisation profile accepts input shapes {shapes}")


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


def prompt_bucket(length: int, max_len: int, smallest: int = 16) -> int:
    """Prompt length rounded up to a power of two (at least `smallest`): CUDA graphs are captured per
    bucket, and left padding (masked) fills the difference."""
    if length > max_len:
        raise ValueError(f"prompt of {length} tokens exceeds the built maximum {max_len}")
    bucket = smallest
    while bucket < length:
        bucket *= 2
    return min(bucket, max_len)


def max_output_bytes(spec: SpecRecord, dtype_bytes: dict[str, int]) -> dict[str, int]:
    """Bytes to preallocate per output: its shape at every dim's max."""
    values = {k: v.max for k, v in spec.dims.items()}
    out = {}
    for t in spec.outputs:
        n = 1
        for d in _resolve(t.shape, values):
            n *= d
        out[t.name] = n * dtype_bytes[t.dtype]
    return out
