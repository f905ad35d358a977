"""Open a build folder: read its manifest, check it fits this machine, create one engine per graph.

The runtime never imports the exporter: the manifest and the graph files are the contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jfexport.reference.errors import JanusFlowError

from .backend_choice import choose_backend

MANIFEST = "manifest.json"
FORMAT = "jfexport-manifest/1"
TOKENIZER_DIR = "tokenizer"


class EnginesError(JanusFlowError):
    pass


def read_build_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise EnginesError(f"{folder}: engines folder does not exist (run `jfexport build --out {folder}`)")
    if not path.is_file():
        raise EnginesError(f"{folder}: no {MANIFEST}; not a finished build (run `jfexport build --out {folder}`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EnginesError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise EnginesError(f"{path}: format {manifest.get('format')!r}, this runtime reads {FORMAT!r}: rebuild the engines")
    return manifest


def pick_precision(manifest: dict, requested: str | None, device: str) -> str:
    available = manifest.get("precisions", ["fp32"])
    if requested is None:
        # ONNX Runtime's CPU kernels run fp16 graphs through casts: fp16 only pays off on a GPU.
        requested = "fp16" if device == "cuda" and "fp16" in available else "fp32"
    if requested not in available:
        raise EnginesError(f"the engines were built for {available}, not {requested} (rebuild with --fp16)")
    return requested


def load_engines(folder: str | Path, backend: str = "auto", precision: str | None = None,
                 device: str | None = None) -> tuple[dict, dict, str]:
    """(engines by graph name, manifest, backend name) for a build folder."""
    folder = Path(folder)
    manifest = read_build_manifest(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = choose_backend(backend).backend if backend != "auto" else manifest.get("backend", {}).get("name", "onnxruntime")
    if chosen == "tensorrt":
        choose_backend("tensorrt")  # raises with install instructions when TensorRT or the GPU is missing
    precision = pick_precision(manifest, precision, device)
    engines = {}
    for name, entry in manifest["graphs"].items():
        files = entry["files"]
        info = files.get(precision) or files["fp32"]
        path = folder / info["file"]
        if not path.is_file():
            raise EnginesError(f"{path}: listed in the manifest but missing (rebuild the engines)")
        if chosen == "tensorrt":
            from .backends.trt_backend import TrtEngine

            engines[name] = TrtEngine.from_manifest_entry(name, folder, entry)
        else:
            from .backends.ort_backend import OrtEngine

            engines[name] = OrtEngine(name, path, device=device)
    return engines, manifest, chosen
