"""`jfexport bench`: stage latencies, end-to-end times and the reference comparison, as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from jfexport import defaults
from jfexport.core.manifest import Manifest
from jfexport.defaults import BACKENDS

from .options import backend_option, load_model, model_options, reference_bundle_for_build
from .output_files import check_json_target, say, write_json


@click.command("bench")
@model_options
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help="Benchmark this build (its backend); default: the torch backend on the model options.")
@backend_option(BACKENDS, "Backend to run --engines with (auto: the one it was built for).")
@click.option("--steps", type=click.IntRange(min=1), default=defaults.STEPS, show_default=True, help="Euler steps per image.")
@click.option("--cfg", default=defaults.CFG, show_default=True, help="Classifier-free guidance weight.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Images per generation call.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed calls before the runs.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed calls per measurement.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=defaults.MAX_NEW_TOKENS, show_default=True,
              help="Longest answer of the understanding benchmark.")
@click.option("--precisions", default=None,
              help="With --engines: benchmark these precisions of the build one after the other in the same run, "
                   "e.g. fp32,int8 (ratios against the first one and against the reference).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads of each side: ONNX Runtime's intra-op threads and the runtime's torch, and the "
                   "reference's torch.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
def bench_cmd(checkpoint, vae, preset, engines, backend, steps, cfg, batch, warmup, runs, max_new_tokens, precisions,
              threads, json_path):
    """Benchmark the runtime against the reference eager pipeline, runs interleaved, same threads each side.

    The first line says what is compared with what; the JSON gives each timing's spread (min, median, max).
    """
    check_json_target(json_path)  # before the imports below, which take seconds
    wanted = _precision_list(precisions, engines)
    from PIL import Image

    from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
    from jfexport.runtime.engines_folder import EngineSet
    from jfexport.runtime.pipelines import JanusFlowRuntime
    from jfexport.tools.bench import bench_pipelines

    if wanted:
        return _bench_precisions(engines, backend, wanted, checkpoint, vae, steps, cfg, batch, warmup, runs,
                                 max_new_tokens, threads, json_path)
    if engines is not None:
        runtime = JanusFlowRuntime.from_engines(engines, backend, torch_threads=threads, engine_threads=threads)
        bundle = reference_bundle_for_build(engines, checkpoint, vae)
        opened = runtime.engines
        if not isinstance(opened, EngineSet):  # from_engines opens a build folder's EngineSet, which knows its precision
            raise TypeError(f"{engines}: the runtime's engines are a {type(opened).__name__}, not an EngineSet")
        side = f"{_ENGINE_NAMES.get(runtime.backend, runtime.backend)} engines ({opened.precision}) of {engines}"
    else:
        bundle = load_model(checkpoint, vae, preset)
        runtime = JanusFlowRuntime.from_bundle(bundle, "torch")
        side = "the runtime on the torch backend (PyTorch eager through the scheduler, no engines: pass --engines DIR)"
    backend = runtime.backend
    compared = _compared(side, bundle.source, threads)
    click.echo(f"{compared}; runs interleaved, {warmup} warmup + {runs} runs each", err=True)
    reference = ReferencePipeline(bundle)
    image = Image.new("RGB", (bundle.image_size, bundle.image_size), (200, 30, 30))
    result = bench_pipelines(runtime, reference, "a red circle at the top left", steps, cfg, batch, warmup, runs,
                             max_new_tokens, "What colour is the shape?", image, threads)
    result = {"compared": compared, "model": bundle.source, "backend": backend,
              "command": " ".join(["jfexport", *sys.argv[1:]]), **result}
    text = json.dumps(result, indent=2)
    say(text)
    if json_path is not None:
        write_json(json_path, text)


_ENGINE_NAMES = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def _compared(side: str, model: str, threads: int) -> str:
    return f"{side} vs the PyTorch eager reference ({model}), {threads} thread{'s' if threads > 1 else ''} each"


def _precision_list(text: str | None, engines: Path | None) -> list[str]:
    from .options import ENGINE_PRECISIONS

    if text is None:
        return []
    if engines is None:
        raise click.UsageError("--precisions benchmarks precisions of one build: pass --engines DIR")
    wanted = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in ENGINE_PRECISIONS]
    if unknown or not wanted:
        raise click.BadParameter(f"{text!r}: a comma-separated list of {', '.join(ENGINE_PRECISIONS)}",
                                 param_hint="--precisions")
    return list(dict.fromkeys(wanted))


def _served_mib(engines: Path, manifest: Manifest, precision: str) -> float:
    """Size of the graph files an onnxruntime runtime at `precision` opens (a graph without one serves fp32)."""
    from jfexport.runtime.folder_files import served_files

    return sum((engines / f.name).stat().st_size for name in manifest.graphs
               for f in served_files(manifest, name, precision, "onnxruntime")) / 2**20


def _bench_precisions(engines, backend, wanted, checkpoint, vae, steps, cfg, batch, warmup, runs, max_new_tokens,
                      threads, json_path) -> None:
    from PIL import Image

    from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
    from jfexport.runtime.pipelines import JanusFlowRuntime
    from jfexport.tools.bench import bench_precisions

    manifest = Manifest.read(engines)
    bundle = reference_bundle_for_build(engines, checkpoint, vae)
    files = {p: _served_mib(engines, manifest, p) for p in wanted}
    name = manifest.backend.name if manifest.backend is not None else "onnxruntime"
    compared = _compared(f"{_ENGINE_NAMES.get(name, name)} engines ({', '.join(wanted)}) of {engines}", bundle.source,
                         threads)
    click.echo(f"{compared}; runs interleaved, {warmup} warmup + {runs} runs each", err=True)
    image = Image.new("RGB", (bundle.image_size, bundle.image_size), (200, 30, 30))
    result = bench_precisions(lambda p: JanusFlowRuntime.from_engines(engines, backend, p, torch_threads=threads,
                                                                      engine_threads=threads),
                              wanted, files, ReferencePipeline(bundle), "a red circle at the top left", steps, cfg,
                              batch, warmup, runs, max_new_tokens, "What colour is the shape?", image, threads)
    result = {"compared": compared, "model": bundle.source, "backend": name,
              "command": " ".join(["jfexport", *sys.argv[1:]]), **result}
    text = json.dumps(result, indent=2)
    say(text)
    if json_path is not None:
        write_json(json_path, text)
