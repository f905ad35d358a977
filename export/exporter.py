"""`jfexport export`: every graph to ONNX, fp32 always and typed fp16 on request, each validated
in ONNX Runtime and checked against the TensorRT operator matrix before it is kept."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from jfexport.reference.bundle import ModelBundle
from jfexport.reference.graphs import GRAPH_NAMES, build_graph, graph_weights

from jfexport import defaults
from jfexport.core.errors import UserError
from jfexport.core.graph_spec import GraphSpec
from jfexport.core.manifest import (
    MANIFEST,
    EnginesError,
    GraphFile,
    GraphRecord,
    Limits,
    Manifest,
    ModelRecord,
    SpecRecord,
    versions,
)

from .build_folder import BuildFolderError, named_os_error, open_build_folder
from .onnx_export import export_graph
from .precision import to_fp16_, use_explicit_softmax
from .trt_ops import check_file
from .validate import compare, reference_cases, validation_dims

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


class ExportError(UserError):
    pass


def select_graphs(names: list[str] | None, specs: dict[str, GraphSpec]) -> list[str]:
    if not names:
        return list(specs)
    unknown = [n for n in names if n not in GRAPH_NAMES]
    if unknown:
        raise ExportError(f"unknown graph(s) {unknown} (known: {', '.join(GRAPH_NAMES)})")
    missing = [n for n in names if n not in specs]
    if missing:
        raise ExportError(f"graph(s) {missing} need a VAE (pass --vae DIR)")
    return names


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def weights_sha256(name: str, bundle: ModelBundle) -> str:
    """Identity of a graph's weights: a rebuild re-exports only graphs whose weights changed."""
    h = hashlib.sha256()
    if name == "vae_decoder":
        h.update(repr(float(bundle.require_vae().config.scaling_factor)).encode())
    for name, tensor in sorted(graph_weights(name, bundle.model, bundle.vae).items()):
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def export_graphs(
    bundle: ModelBundle,
    out: Path,
    names: list[str],
    precisions: tuple[str, ...] = ("fp32",),
    limits: Limits = Limits(),
    progress: Progress = lambda msg: None,
) -> dict[str, GraphRecord]:
    """Export, validate and check `names` into the existing folder `out` (a build's staging folder);
    returns their manifest entries, file names relative to `out`. `precisions` without fp32 adds
    typed graphs beside fp32 graphs a build keeps; every graph is checked against the fp32 model.

    The bundle's model is converted to fp16 in place when fp16 is asked for: export consumes it.
    """
    out = Path(out)
    specs = bundle.graph_specs(limits)
    use_explicit_softmax(bundle.model)
    bundle.model.float()
    entries = {n: GraphRecord(SpecRecord.from_json(specs[n].to_json()), weights_sha256(n, bundle), {}) for n in names}
    cases = {name: reference_cases(build_graph(name, bundle.model, bundle.vae), specs[name],
                                   validation_dims(specs[name])) for name in names}
    staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=out))
    try:
        for precision in sorted(precisions, key=lambda p: p != "fp32"):
            if precision == "fp16":
                to_fp16_(bundle.model)
            for name in names:
                spec = specs[name]
                if precision not in spec.precisions:
                    progress(f"{name}: stays fp32 in an {precision} build (fp16 overflows the SDXL VAE)")
                    continue
                module = build_graph(name, bundle.model, bundle.vae)
                start = time.perf_counter()
                progress(f"{name} [{precision}]: exporting")
                path = export_graph(module, spec, precision, staging)
                seconds = time.perf_counter() - start
                parity = compare(path, spec, precision, cases[name])
                findings = check_file(path)
                progress(f"{name} [{precision}]: {seconds:.1f}s, max abs {parity.max_abs:.2e}, rel {parity.max_rel:.2e}"
                         f" ({parity.worst_output or '-'}), TensorRT ops {'ok' if not findings else 'FAIL'}")
                if not parity.ok:
                    raise ExportError(f"{name} [{precision}]: ONNX Runtime output {parity.worst_output!r} differs from "
                                      f"PyTorch (max abs {parity.max_abs:.3e}, rel {parity.max_rel:.3e}); nothing kept")
                if findings:
                    raise ExportError(f"{name} [{precision}]: TensorRT cannot parse: " + "; ".join(map(str, findings[:5])))
                files = sorted(staging.iterdir())
                for f in files:
                    f.replace(out / f.name)
                entries[name].files[precision] = GraphFile.recorded(
                    out, path.name, [f.name for f in files if f.name != path.name], parity.to_json(),
                    export_seconds=round(seconds, 2), peak_rss_gib=round(_peak_rss_gib(), 2))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entries


class BuildLimitsError(UserError):
    pass


def build_limits(bundle: ModelBundle, max_batch: int = defaults.MAX_BATCH, max_seq: int | None = None) -> Limits:
    """The build's limits: `max_seq` defaults to the model's positions (at most 4096) and may not exceed them."""
    positions = bundle.config.language.max_position_embeddings
    # The graphs are exported at sample sizes (jfexport/core/graph_specs.py) that every range must hold, so
    # that no dimension is baked in: 3 rows, and a sequence of 11 tokens after a past of 7.
    if max_batch < 3:
        raise BuildLimitsError(f"--max-batch {max_batch}: at least 3 rows (the export samples 3)")
    if max_seq is not None and max_seq < 12:
        raise BuildLimitsError(f"--max-seq {max_seq}: at least 12 tokens (the export samples 11 after a past of 7)")
    if max_seq is None:
        return Limits(max_batch, min(defaults.MAX_SEQ, positions))
    if max_seq > positions:
        raise BuildLimitsError(f"--max-seq {max_seq} exceeds the model's max_position_embeddings {positions} "
                               f"({bundle.source}): build with --max-seq {positions} or less")
    return Limits(max_batch, max_seq)


def manifest_for(bundle: ModelBundle, limits: Limits, precisions: tuple[str, ...],
                 graphs: dict[str, GraphRecord]) -> Manifest:
    """An export's manifest (a build adds its backend, tokenizer and INT8 records)."""
    model = ModelRecord(bundle.source, bundle.fingerprint, bundle.config.to_dict(), bundle.image_size, bundle.latent_size,
                        bundle.latent_channels, bundle.config.image_grid(bundle.latent_size))
    return Manifest(datetime.now(timezone.utc).isoformat(timespec="seconds"), versions(), model, limits,
                    list(dict.fromkeys(("fp32", *precisions))), graphs)


def export_all(bundle: ModelBundle, out: Path, graphs: list[str] | None = None, precisions: tuple[str, ...] = ("fp32",),
               limits: Limits | None = None, progress: Progress = lambda msg: None) -> Manifest:
    """`jfexport export`: every selected graph, then the manifest; returns the manifest.

    An export folder is a workbench: its graphs keep their plain names and are replaced by the
    next export. A build folder is refused (its manifest would be replaced by one without the
    backend, tokenizer and other graphs); export writes nowhere until every graph has passed.
    `limits` defaults to a build's (`build_limits`), so that a runtime accepts the manifest.
    """
    limits = build_limits(bundle) if limits is None else limits
    names = select_graphs(graphs, bundle.graph_specs(limits))
    out = Path(out)
    try:
        with open_build_folder(out, _export_folder_manifest, progress) as session:
            entries = export_graphs(bundle, session.staging, names, precisions, limits, progress)
            for entry in entries.values():
                for info in entry.files.values():
                    for name in info.names():
                        os.replace(session.staging / name, out / name)
            manifest = manifest_for(bundle, limits, precisions, entries)
            manifest.write(out, scratch=session.staging)  # a kill leaves no temp file in DIR
    except OSError as e:
        raise named_os_error(out, e) from None
    return manifest


def _export_folder_manifest(out: Path) -> Manifest | None:
    """The manifest of a previous export into `out`; a build's manifest refuses the export, whatever its format
    or state (a damaged build is still not the export's to replace)."""
    try:
        manifest = Manifest.read(out)
    except EnginesError:
        manifest = None
    if manifest.is_build if manifest is not None else _names_a_backend(out / MANIFEST):
        raise BuildFolderError(f"{out}: holds a `jfexport build` ({out / MANIFEST}); `jfexport export` would replace its "
                               "manifest and break it: export into another folder, or rebuild with `jfexport build`")
    return manifest


def _names_a_backend(path: Path) -> bool:
    """A manifest that cannot be read as this version's says it is a build's (`backend` is what only builds write)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "backend" in data
