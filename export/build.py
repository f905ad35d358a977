"""`jfexport build`: export + checks + backend preparation + manifest, recompiling only what is stale.

A graph is reused when its weights hash, the tool versions, the build limits and its files'
hashes all match the previous manifest; anything else is rebuilt. The tokenizer and processor
files are copied in, so a build folder is all a runtime needs.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

from jfexport.reference.bundle import ModelBundle
from jfexport.runtime.backend_choice import BackendChoice, choose_backend

from .exporter import Progress, export_graphs, manifest_for, prepare_output, weights_sha256
from .manifest import EnginesError, read_build_manifest, sha256_file, versions, write_manifest
from .specs import Limits, graph_specs

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                   "preprocessor_config.json")
TOKENIZER_DIR = "tokenizer"


def _reusable(entry: dict | None, out: Path, weights: str, wanted: tuple[str, ...], spec_json: dict) -> bool:
    if entry is None or entry.get("weights_sha256") != weights or entry.get("spec") != spec_json:
        return False
    files = entry.get("files", {})
    if set(wanted) - set(files):
        return False
    return all((out / f["file"]).is_file() and sha256_file(out / f["file"]) == f["sha256"] for f in files.values())


def previous_manifest(out: Path) -> dict | None:
    try:
        return read_build_manifest(out)
    except EnginesError:
        return None


def build(bundle: ModelBundle, out: Path, fp16: bool = False, backend: str = "auto", limits: Limits = Limits(),
          progress: Progress = lambda msg: None) -> dict:
    choice: BackendChoice = choose_backend(backend)
    if choice.backend == "torch":
        raise EnginesError("`build` prepares engines for onnxruntime or tensorrt; the torch backend needs no build")
    progress(f"backend: {choice.backend} ({choice.reason})")
    out = Path(out)
    prepare_output(out)
    precisions = ("fp32", "fp16") if fp16 else ("fp32",)
    specs = graph_specs(bundle, limits)
    prev = previous_manifest(out)
    same_tools = prev is not None and prev.get("versions") == versions() and prev.get("limits") == {
        "max_batch": limits.max_batch, "max_seq": limits.max_seq}
    entries: dict[str, dict] = {}
    stale: list[str] = []
    for name, spec in specs.items():
        weights = weights_sha256(name, bundle)
        old = prev["graphs"].get(name) if same_tools else None
        wanted = tuple(p for p in precisions if p in spec.precisions)
        if _reusable(old, out, weights, wanted, spec.to_json()):
            entries[name] = old
            progress(f"{name}: up to date")
        else:
            stale.append(name)
    if "fp16" in precisions and "vae_decoder" in specs:
        progress("vae_decoder: built fp32 (the SDXL VAE overflows in fp16)")
    if stale:
        entries.update(export_graphs(bundle, out, stale, precisions, limits, progress))
    _copy_processor_files(bundle, out)
    manifest = manifest_for(bundle, limits, precisions, {n: entries[n] for n in specs})
    if choice.backend == "tensorrt":
        from .tensorrt_build import build_engines

        # The PyTorch model is not needed any more: give its memory to the TensorRT builder.
        bundle.model = bundle.vae = None
        gc.collect()
        build_engines(out, manifest["graphs"], progress)
    manifest["backend"] = {"name": choice.backend, "reason": choice.reason}
    manifest["rebuilt"] = stale
    write_manifest(out, manifest)
    _remove_orphans(out, manifest)
    return manifest


def _copy_processor_files(bundle: ModelBundle, out: Path) -> None:
    if bundle.processor_folder is None:
        return
    target = out / TOKENIZER_DIR
    target.mkdir(exist_ok=True)
    for name in PROCESSOR_FILES:
        src = bundle.processor_folder / name
        if src.is_file():
            shutil.copy2(src, target / name)


def _remove_orphans(out: Path, manifest: dict) -> None:
    """Delete graph files no manifest entry names (left by an earlier build of other graphs)."""
    keep: set[str] = set()
    for entry in manifest["graphs"].values():
        for info in entry["files"].values():
            keep.add(info["file"])
            keep.update(info.get("external_data", []))
            keep.update(info.get("engine", {}).get("files", []))
    for path in out.iterdir():
        if path.is_file() and path.suffix in (".onnx", ".data", ".engine", ".plan") and path.name not in keep:
            path.unlink()
