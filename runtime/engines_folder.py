"""Open a build folder: read and validate its manifest, check the files it serves, create one engine per graph.

The runtime never imports the exporter: the manifest and the graph files are the contract. Nothing
is opened before the manifest has passed its checks (`jfexport.core.manifest`) and every path it names is
confined to the folder; nothing is served before its file matches the manifest (`folder_files`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

# What each pipeline runs (GENERATION_GRAPHS, UNDERSTANDING_GRAPHS): pass one as `graphs` and a text-to-image
# service does not open the vision encoder, a chat one not the VAE. One definition, in the graph contract.
from jfexport.core.errors import InputError
from jfexport.core.graph_contract import GENERATION_GRAPHS, UNDERSTANDING_GRAPHS
from jfexport.core.manifest import MANIFEST, EnginesError, Int8Record, Manifest, SpecRecord

from .backend_choice import choose_backend
from .engine import Engine
from .folder_files import FileCheck, check_files, confine_tokenizer, served_files, tokenizer_files
from .int8_arithmetic import MATMUL_TOLERANCE, WEIGHT_MAX, cpu_name, describe_cpu, matmul_error

log = logging.getLogger(__name__)

__all__ = ["GENERATION_GRAPHS", "UNDERSTANDING_GRAPHS", "CheckedBuild", "EngineSet", "check_build", "load_engines",
           "pick_precision"]


class EngineSet(dict):
    """Engines by graph name, and how they were opened: `verify` holds them to the bounds of `precision`."""

    def __init__(self, engines: dict, precision: str, device: str, files: dict[str, list[FileCheck]],
                 tokenizer: Path):
        super().__init__(engines)
        self.precision = precision  # the build precision chosen (a graph without a typed file serves fp32)
        self.device = device  # where the engines run (cpu when onnxruntime has no CUDA provider)
        self.files = files  # per graph (and "tokenizer"), how each of its files was checked
        self.tokenizer = tokenizer  # the tokenizer folder checked against the manifest: load the processor from it


def pick_precision(manifest: Manifest, requested: str | None, device: str) -> str:
    available = manifest.precisions
    if requested is None:
        # ONNX Runtime's CPU kernels run fp16 graphs through casts: fp16 only pays off on a GPU. INT8 is
        # never chosen for the caller: it trades accuracy for speed (README "INT8"), so it is asked for.
        requested = "fp16" if torch.device(device).type == "cuda" and "fp16" in available else "fp32"
    if requested not in available:
        how = {"fp16": " (rebuild with --fp16)", "int8": " (rebuild with --int8)"}.get(requested, "")
        raise EnginesError(f"the engines were built for {available}, not {requested}{how}")
    return requested


def check_int8_arithmetic(folder: Path, record: Int8Record) -> None:
    """Refuse INT8 engines whose weights this CPU's ONNX Runtime kernels cannot multiply exactly
    (runtime/int8_arithmetic.py): they would serve silently degraded results. A CPU other than the
    build's is re-checked here, never trusted by name."""
    weight_max = record.weight_max
    built_on = cpu_name(record.cpu)
    here = describe_cpu()
    error = matmul_error(weight_max)
    if error > MATMUL_TOLERANCE:
        raise EnginesError(
            f"{folder}: the INT8 engines were built on {built_on} with weights up to +-{weight_max}; on this CPU, "
            f"{cpu_name(here)}, ONNX Runtime multiplies such weights {error:.1%} off exact integer arithmetic (its int16 "
            f"pair sums saturate), so they would serve degraded results. Rebuild with `jfexport build --int8` "
            f"(weights within +-{WEIGHT_MAX}, exact on every CPU), or serve --precision fp32")
    if record.cpu["isa"] != here["isa"]:
        log.info("%s: INT8 engines built on %s, served on %s: INT8 arithmetic re-checked, exact", folder, built_on,
                 cpu_name(here))


def _select_graphs(manifest: Manifest, graphs: Iterable[str] | None, folder: Path) -> list[str]:
    if graphs is None:
        return list(manifest.graphs)
    names = list(dict.fromkeys([graphs] if isinstance(graphs, str) else graphs))
    missing = [n for n in names if n not in manifest.graphs]
    if missing:
        raise EnginesError(f"{folder / MANIFEST}: no graph(s) {missing} in this build (it has "
                           f"{', '.join(manifest.graphs)}): rebuild with them")
    return names


@dataclass(frozen=True)
class CheckedBuild:
    """What `check_build` established: everything needed to open the engines, nothing opened yet."""

    folder: Path
    manifest: Manifest
    backend: str
    device: str
    precision: str
    graphs: tuple[str, ...]  # the graphs to open
    files: dict[str, list[FileCheck]]  # per graph to open (and "tokenizer"), how each of its files was checked
    tokenizer: Path  # the tokenizer folder the manifest names, its files checked against the manifest's hashes


def _check_device(device: object) -> str | None:
    if device is None:
        return None
    try:
        kind = torch.device(device).type if isinstance(device, str) else None
    except RuntimeError:
        kind = None
    if not isinstance(device, str) or kind not in ("cpu", "cuda"):
        raise InputError(f"device: expected None, \"cpu\", \"cuda\" or \"cuda:N\", got {device!r}")
    return device


def check_build(folder: str | Path, backend: str = "auto", precision: str | None = None, device: str | None = None,
                graphs: Iterable[str] | None = None, verify_files: bool = False) -> CheckedBuild:
    """Validate the manifest, confine its paths and check the files `graphs` are served from (all graphs by
    default); `verify_files` hashes every file even where a verified stamp says it is unchanged."""
    folder = Path(folder)
    manifest = Manifest.read(folder)
    names = _select_graphs(manifest, graphs, folder)
    device = _check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu")
    if backend != "auto":
        chosen = choose_backend(backend).backend
    else:  # an export folder has no backend: ONNX Runtime serves its graphs
        chosen = manifest.backend.name if manifest.backend is not None else "onnxruntime"
    if chosen == "tensorrt":
        choose_backend("tensorrt")  # raises with install instructions when TensorRT or the GPU is missing
    else:
        from .backends.ort_backend import ort_device

        device = ort_device(device)  # before the precision: fp16 is chosen only where it runs on a GPU
    precision = pick_precision(manifest, precision, device)
    if precision == "int8" and chosen == "onnxruntime" and torch.device(device).type == "cpu":
        if manifest.int8 is None:  # the manifest's own check requires the record of an INT8 build
            raise EnginesError(f"{folder / MANIFEST}: an INT8 build without its int8 record")
        check_int8_arithmetic(folder, manifest.int8)
    listed = {name: served_files(manifest, name, precision, chosen) for name in names}
    tokenizer = confine_tokenizer(folder, manifest)
    listed["tokenizer"] = tokenizer_files(manifest)
    checks = iter(check_files(folder, [f for files in listed.values() for f in files], full=verify_files))
    return CheckedBuild(folder, manifest, chosen, device, precision, tuple(names),
                        {name: [next(checks) for _ in files] for name, files in listed.items()}, tokenizer)


def check_tensors(name: str, path: Path, spec: SpecRecord, inputs: Iterable[str], outputs: Iterable[str]) -> None:
    """A file whose tensors are not its graph's (files swapped between graphs in a manifest whose hashes
    were made to match, or a graph replaced) is refused when it is opened, naming it, rather than met as a
    missing input in the middle of a request. Every input the file takes is one the graph's spec feeds,
    and every output the spec names is one the file gives."""
    unknown = sorted(set(inputs) - {t.name for t in spec.inputs})
    missing = sorted({t.name for t in spec.outputs} - set(outputs))
    if unknown or missing:
        def few(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

        what = "; ".join(part for part in (unknown and f"it takes inputs the graph has not ({few(unknown)})",
                                           missing and f"it lacks outputs the graph gives ({few(missing)})") if part)
        raise EnginesError(f"{path}: listed as graph {name}, but it is not that graph: {what}")


def load_engines(folder: str | Path, backend: str = "auto", precision: str | None = None, device: str | None = None,
                 graphs: Iterable[str] | None = None, verify_files: bool = False,
                 threads: int | None = None) -> tuple[EngineSet, Manifest, str]:
    """(engines by graph name, manifest, backend name) for a build folder, after `check_build`.

    `graphs` opens only those graphs, e.g. GENERATION_GRAPHS; all by default. The EngineSet says the
    precision and device chosen. `threads`: ONNX Runtime's intra-op threads per graph (None: its
    default, one per physical core).
    """
    build = check_build(folder, backend, precision, device, graphs, verify_files)
    engines: dict[str, Engine] = {}
    for name in build.graphs:
        if build.backend == "tensorrt":
            from .backends.trt_backend import TrtEngine

            trt_engine = TrtEngine.from_manifest_entry(name, build.folder, build.manifest.graphs[name],
                                                       build.precision)
            check_tensors(name, trt_engine.path, build.manifest.graphs[name].spec, trt_engine.inputs,
                          trt_engine.outputs)
            engines[name] = trt_engine
        else:
            from .backends.ort_backend import OrtEngine

            path = build.folder / build.files[name][0].file.name
            engine = OrtEngine(name, path, device=build.device, threads=threads)
            check_tensors(name, path, build.manifest.graphs[name].spec, engine.input_dtypes, engine.output_names)
            engines[name] = engine
    return (EngineSet(engines, build.precision, build.device, build.files, build.tokenizer), build.manifest,
            build.backend)
