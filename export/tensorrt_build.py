"""Compile the typed ONNX graphs of a build folder into TensorRT engines (polygraphy's builder).

Thin by design: everything decidable without TensorRT (profiles, names, staleness) lives in
`trt_plan` and is tested on CPU. Networks are strongly typed: precision comes from the ONNX
graphs (fp16 with fp32 islands, the VAE fp32), never from builder flags, which TensorRT 11 drops.
Engines are built one at a time; the timing cache is shared across graphs and rebuilds.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

from jfexport.runtime.trt_plan import engine_file_name, engine_is_current, gpu_compute_capability

from jfexport.core.manifest import EngineRecord, GraphFile, GraphRecord, sha256_file
from jfexport.core.profiles import optimization_profiles

TIMING_CACHE = "timing.cache"
OPTIMIZATION_LEVEL = 3  # TensorRT's default: level 5 multiplies build time for a few percent


def build_engines(out: Path, entries: dict[str, GraphRecord], progress: Callable[[str], None], scratch: Path,
                  workspace_bytes: int | None = None) -> list[tuple[str, str]]:
    """Add an `engine` record to each typed file entry of every graph, rebuilding only stale ones.

    New engines are written into `scratch` (the build's staging folder; their `file` is relative to
    it) so that the live build's engines stay untouched; returns the (graph, precision) of each new engine."""
    import tensorrt as trt

    version, capability = trt.__version__, gpu_compute_capability()
    cache = out / TIMING_CACHE
    built = []
    for name, entry in entries.items():
        for precision in engine_precisions(entry.files):
            if _build_one(name, entry, precision, out, scratch, cache, version, capability, workspace_bytes, progress):
                built.append((name, precision))
    return built


def engine_precisions(files: dict[str, GraphFile]) -> list[str]:
    """The typed graphs that get an engine: fp16 and int8 (its Q/DQ graph, explicitly quantized) when
    built, fp32 only for a graph that has neither (the VAE, an fp32-only build)."""
    typed: list[str] = [p for p in ("fp16", "int8") if p in files]
    return typed or ["fp32"]


def _build_one(name: str, entry: GraphRecord, precision: str, out: Path, scratch: Path, cache: Path, version: str,
               capability: str, workspace_bytes: int | None, progress: Callable[[str], None]) -> bool:
    """Build the engine of one typed graph unless it is current; True if a new engine was written."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    info = entry.files[precision]
    onnx_sha = info.sha256
    if info.engine is not None and engine_is_current(info, onnx_sha, version, capability) \
            and (out / info.engine.file).is_file():
        progress(f"{name} [{precision}]: TensorRT engine up to date")
        return False
    profiles = []
    for ranges in optimization_profiles(name, entry.spec):
        profile = Profile()
        for tensor, (mn, opt, mx) in ranges.items():
            profile.add(tensor, min=mn, opt=opt, max=mx)
        profiles.append(profile)
    progress(f"{name} [{precision}]: building TensorRT engine ({len(profiles)} profile(s))")
    network = network_from_onnx_path(str(out / info.file), strongly_typed=True)
    limits = {trt.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes else None
    config = CreateConfig(profiles=profiles, builder_optimization_level=OPTIMIZATION_LEVEL,
                          memory_pool_limits=limits, load_timing_cache=str(cache) if cache.is_file() else None)
    engine = engine_from_network(network, config, save_timing_cache=str(cache))
    file_name = engine_file_name(name, precision, version, capability)
    save_engine(engine, path=str(scratch / file_name))
    info.engine = EngineRecord(file_name, sha256_file(scratch / file_name), version, capability, onnx_sha, len(profiles))
    del engine, network
    gc.collect()
    return True
