"""`jfexport build`: export + checks + backend preparation + manifest, recompiling only what is stale.

A graph is reused when its weights hash, the tool versions, the build limits and its files'
hashes all match the previous manifest; anything else is rebuilt. The tokenizer and processor
files are copied in, so a build folder is all a runtime needs. How a build writes its folder
(staging, lock, the manifest as commit point) is `build_folder`'s job.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from pathlib import Path

from jfexport.reference.bundle import ModelBundle
from jfexport.runtime.backend_choice import BackendChoice, choose_backend
from jfexport.runtime.folder_files import confine_manifest
from jfexport.runtime.int8_arithmetic import MATMUL_TOLERANCE, WEIGHT_MAX, cpu_name, describe_cpu, matmul_error

from jfexport.core.errors import UserError
from jfexport.core.graph_spec import GraphSpec
from jfexport.core.manifest import (
    MANIFEST,
    BackendRecord,
    CalibrationRecord,
    EnginesError,
    GateRecord,
    GraphRecord,
    Int8Record,
    Limits,
    Manifest,
    sha256_file,
    versions,
)

from .build_folder import BuildFolder, named_os_error, open_build_folder
from .exporter import Progress, build_limits, export_graphs, manifest_for, weights_sha256
from .quantize.cache import read_cache, write_cache
from .quantize.int8_build import QUANTIZED_GRAPHS, build_int8
from .quantize.int8_gate import end_to_end_gate
from .quantize.requests import Recipe

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                   "preprocessor_config.json")


class Int8ArithmeticError(UserError):
    pass


def _reusable(entry: GraphRecord | None, out: Path, weights: str, wanted: tuple[str, ...], spec: GraphSpec) -> bool:
    if entry is None or entry.weights_sha256 != weights or entry.spec.to_json() != spec.to_json():
        return False
    if set(wanted) - set(entry.files):
        return False
    records = [r for f in entry.files.values() for r in (f.record, *f.external_data)]
    return all((out / r.file).is_file() and sha256_file(out / r.file) == r.sha256 for r in records)


def previous_manifest(out: Path, progress: Progress = lambda msg: None) -> Manifest | None:
    """The folder's previous build, if its manifest is one a runtime would serve: its format, its checks and every
    path it names confined to the folder. Anything else (an older format included) is reused from nothing and has
    none of its files replaced or removed (one warning line, naming the format or the key path at fault)."""
    if not (out / MANIFEST).exists() and not (out / MANIFEST).is_symlink():
        return None
    try:
        manifest = Manifest.read(out)
        confine_manifest(out, manifest)
    except EnginesError as e:
        message = str(e) if str(e).startswith(str(out)) else f"{out / MANIFEST}: {e}"
        progress(f"warning: {message}; the previous build is not reused (every graph is rebuilt) and none of its "
                 "files are removed")
        return None
    return manifest


def build(bundle: ModelBundle, out: Path, fp16: bool = False, backend: str = "auto", limits: Limits | None = None,
          progress: Progress = lambda msg: None, int8: bool = False, recipe: Recipe = Recipe()) -> Manifest:
    """Build `out` all-or-nothing; `limits` defaults to `build_limits(bundle)`. `int8` adds calibrated Q/DQ
    graphs (`recipe` says how they are calibrated; the manifest's `calibration.calibrated` lists the
    graphs calibrated by this build, the others took their ranges from the folder's calibration cache)."""
    choice: BackendChoice = choose_backend(backend)
    if choice.backend == "torch":
        raise EnginesError("`build` prepares engines for onnxruntime or tensorrt; the torch backend needs no build")
    limits = build_limits(bundle) if limits is None else build_limits(bundle, limits.max_batch, limits.max_seq)
    progress(f"backend: {choice.backend} ({choice.reason})")
    out = Path(out)
    try:
        with open_build_folder(out, lambda folder: previous_manifest(folder, progress), progress) as session:
            return _build_in(session, bundle, fp16, int8, recipe, choice, limits, progress)
    except OSError as e:
        raise named_os_error(out, e) from None


def _build_in(session: BuildFolder, bundle: ModelBundle, fp16: bool, int8: bool, recipe: Recipe, choice: BackendChoice,
              limits: Limits, progress: Progress) -> Manifest:
    out = session.folder
    precisions = ("fp32", *(("fp16",) if fp16 else ()), *(("int8",) if int8 else ()))
    specs = bundle.graph_specs(limits)
    prev = session.previous
    same_tools = prev is not None and prev.versions == versions() and prev.limits == limits
    # INT8 files of another weight scheme (see runtime/int8_arithmetic.py) are never reused; graphs the previous
    # gate kept fp32 need no INT8 file to be reused.
    int8_record = prev.int8 if prev is not None and same_tools else None
    same_int8 = int8_record is not None and int8_record.weight_max == WEIGHT_MAX
    gate = int8_record.gate if int8_record is not None and same_int8 else None
    kept_fp32 = set(gate.kept_fp32) if gate is not None else set()
    entries: dict[str, GraphRecord] = {}
    stale: list[str] = []  # exported anew, every precision
    added: dict[str, tuple[str, ...]] = {}  # up to date, with precisions this build adds
    for name, spec in specs.items():
        weights = weights_sha256(name, bundle)
        old = prev.graphs.get(name) if prev is not None and same_tools else None
        wanted = tuple(p for p in precisions if p in spec.precisions and not (p == "int8" and name in kept_fp32))
        if old is not None and "int8" in wanted and not same_int8:
            # INT8 files of another weight scheme are never reused; the graph's other files may be.
            old = dataclasses.replace(old, files={p: f for p, f in old.files.items() if p != "int8"})
        if old is not None and _reusable(old, out, weights, ("fp32",), spec):
            entries[name] = copy.deepcopy(old)  # the TensorRT step edits entries; the previous manifest must not change
            # Files of a precision this build does not make are not listed (and so retired at the commit).
            entries[name].files = {p: f for p, f in entries[name].files.items() if p in precisions}
            missing = tuple(p for p in wanted if p not in entries[name].files)
            if missing:
                added[name] = missing
                progress(f"{name}: {', '.join(entries[name].files)} up to date, kept; adding {', '.join(missing)}")
            else:
                progress(f"{name}: up to date" + (" (fp32: the SDXL VAE overflows in fp16)"
                                                  if "fp16" in precisions and "fp16" not in wanted else ""))
        else:
            stale.append(name)
    typed = tuple(p for p in precisions if p != "int8")  # INT8 graphs are made from the fp32 ones below
    if stale:
        entries.update(export_graphs(bundle, session.staging, stale, typed, limits, progress))
    fp16_only = [n for n, missing in added.items() if "fp16" in missing]
    if fp16_only:
        exported = export_graphs(bundle, session.staging, fp16_only, ("fp16",), limits, progress)
        for name in fp16_only:
            entries[name].files["fp16"] = exported[name].files["fp16"]
    quantize = stale + [n for n, missing in added.items() if "int8" in missing]
    calibration, int8_record = (_int8_step(session, bundle, limits, entries, stale, quantize, recipe, progress)
                                if int8 else (None, None))
    for name in specs:
        files = entries[name].files
        new = files if name in stale else {p: files[p] for p in added.get(name, ()) if p in files}
        for info in new.values():
            prefix = session.place(info.names())
            info.file = prefix + info.file
            for extra in info.external_data:
                extra.file = prefix + extra.file
    manifest = manifest_for(bundle, limits, precisions, {n: entries[n] for n in specs})
    manifest.tokenizer, manifest.tokenizer_dir = session.stage_tokenizer(_processor_files(bundle))
    manifest.calibration, manifest.int8 = calibration, int8_record
    if choice.backend == "tensorrt":
        from .tensorrt_build import build_engines

        # The PyTorch model is not needed any more: give its memory to the TensorRT builder.
        bundle.model = bundle.vae = None  # type: ignore[assignment]  # the bundle is not used after this
        gc.collect()
        for name, precision in build_engines(out, manifest.graphs, progress, session.staging):
            engine = manifest.graphs[name].files[precision].engine
            if engine is None:
                raise RuntimeError(f"{name} [{precision}]: the TensorRT step reported an engine it did not record")
            engine.file = session.place([engine.file]) + engine.file
    manifest.backend = BackendRecord(choice.backend, choice.reason)
    manifest.rebuilt = stale
    # Beside kept files of the graph (an INT8 file the gate refused was not added).
    manifest.added = {n: ps for n, p in added.items() if (ps := [x for x in p if x in entries[n].files])}
    session.commit(manifest)
    for line in _kept_and_removed(prev, manifest, precisions):
        progress(line)
    return manifest


def _kept_and_removed(prev: Manifest | None, manifest: Manifest, precisions: tuple[str, ...]) -> list[str]:
    """What the build kept of the previous one, and the graph files it removed, by precision."""
    if prev is None:
        return []
    files = {(n, p) for n, g in manifest.graphs.items() for p in g.files}
    before = {(n, p) for n, g in prev.graphs.items() for p in g.files}
    kept_files = {(n, p) for n, p in before & files
                  if prev.graphs[n].files[p].sha256 == manifest.graphs[n].files[p].sha256}
    lines = []
    for label, pairs in (("kept", kept_files), ("removed", before - files)):
        for precision in ("fp32", "fp16", "int8"):
            names = sorted(n for n, p in pairs if p == precision)
            if not names:
                continue
            asked = precision in precisions
            why = "" if label == "kept" or asked else f" (not asked for: build with --{precision} to keep them)"
            lines.append(f"{label} {precision}: {', '.join(names)}{why}")
    return lines


def _int8_step(session: BuildFolder, bundle: ModelBundle, limits: Limits, entries: dict[str, GraphRecord],
               stale: list[str], quantize: list[str], recipe: Recipe,
               progress: Progress) -> tuple[CalibrationRecord, Int8Record]:
    """INT8 files of the quantized graphs among `quantize` into staging (listed in `entries`, placed with
    the others; the fp32 graphs of `stale` are in staging, the others in the folder), held to the
    end-to-end gate; returns the calibration cache's manifest record (the file placed here when it
    changed) and the `int8` record (weight scheme, the CPU it was checked on, the gate's verdict)."""
    prev = session.previous
    names = [n for n in quantize if n in QUANTIZED_GRAPHS]
    if not names and prev is not None and prev.int8 is not None and prev.calibration is not None:
        return dataclasses.replace(prev.calibration, calibrated=[]), copy.deepcopy(prev.int8)
    cpu, arithmetic = describe_cpu(), matmul_error(WEIGHT_MAX)
    if arithmetic > MATMUL_TOLERANCE:
        raise Int8ArithmeticError(f"int8: on this CPU, {cpu_name(cpu)}, ONNX Runtime's INT8 MatMul is {arithmetic:.1%} off "
                                  f"exact integer arithmetic even with weights within +-{WEIGHT_MAX}: INT8 engines "
                                  "cannot be built here (build without --int8)")
    fp32_files = {n: (session.staging if n in stale else session.folder) / e.files["fp32"].file
                  for n, e in entries.items()}
    previous = prev.calibration if prev is not None else None
    cached = read_cache(session.folder, previous)
    graphs = build_int8(bundle, limits, fp32_files, names, {n: entries[n].weights_sha256 for n in names},
                        session.staging, cached, recipe, progress)
    for name, graph in graphs.items():
        entries[name].files["int8"] = graph.file
    int8_files = {n: (session.staging if n in graphs else session.folder) / e.files["int8"].file
                  for n, e in entries.items() if "int8" in e.files}
    gate = end_to_end_gate(bundle, limits, fp32_files, int8_files, progress)
    for name in gate.kept_fp32:
        info = entries[name].files.pop("int8")
        if name in graphs:  # staged by this build: not placed, not listed (a reused file is retired at the commit)
            for written in info.names():
                (session.staging / written).unlink()
    # Kept fp32 by this gate or, for graphs this build reused, by an earlier one.
    kept_fp32 = [n for n in QUANTIZED_GRAPHS if n in entries and "int8" not in entries[n].files]
    verdict = GateRecord(**{**gate.to_json(), "kept_fp32": kept_fp32})
    int8_record = Int8Record(WEIGHT_MAX, cpu, arithmetic, verdict)
    kept = {n: e for n, e in cached.items() if n in entries and n not in graphs}
    path = write_cache(session.staging, {**kept, **{n: g.cache for n, g in graphs.items()}})
    digest = sha256_file(path)
    calibrated = [n for n, g in graphs.items() if g.calibrated]
    if previous is not None and previous.sha256 == digest:
        path.unlink()  # same ranges: the file in place stays, untouched
        return dataclasses.replace(previous, calibrated=calibrated), int8_record
    prefix = session.place([path.name])
    return CalibrationRecord(prefix + path.name, digest, calibrated, recipe.key()), int8_record


def _processor_files(bundle: ModelBundle) -> dict[str, Path]:
    if bundle.processor_folder is None:
        return {}
    return {name: bundle.processor_folder / name for name in PROCESSOR_FILES
            if (bundle.processor_folder / name).is_file()}
