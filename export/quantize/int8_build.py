"""The INT8 step of `jfexport build --int8`: calibrate (or take the cached ranges), measure every
layer, write the Q/DQ graph into the build's staging folder, and refuse it unless it passes.

Quantized: the linear layers (MatMul on a weight) of llm_prefill, llm_decode, gen_encoder and
gen_decoder. Kept fp32: norms, softmax, attention's activation-by-activation products, the time
embedding (its Gemms, and any layer named time_embed), the LLM head and the FiLM mappers (Gemms on
a [B, D] vector: negligible work, and the head decides the greedy tokens), convolutions, and every
layer whose own INT8 output error exceeds the recipe's threshold. The VAE, the vision encoder and
the token embedding have no INT8 file: an int8 runtime serves their fp32 graphs.

The parity check runs the INT8 graph and the fp32 graph (itself checked against PyTorch) on
held-in samples recorded from real requests; an output whose relative RMS error exceeds
OUTPUT_BOUND refuses the graph, naming the layer with the largest error among those quantized.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from jfexport.reference.bundle import ModelBundle

from jfexport.core.errors import UserError
from jfexport.core.graph_contract import NEW, PAST
from jfexport.core.manifest import GraphFile, Limits

from ..samples import meaningful
from ..trt_ops import check_model
from .cache import cache_key, usable
from .calibrate import Activations, LayerError, RangeObserver, layer_errors, numpy_feeds
from .qdq import EXTERNAL_DATA_FROM, Layer, insert_qdq, linear_layers, save_graph
from .requests import Recipe, Recorder, requests, run_requests

QUANTIZED_GRAPHS = ("llm_prefill", "llm_decode", "gen_encoder", "gen_decoder")
KEEP_FP32 = ("time_embed",)  # module-name fragments never quantized, whatever their error
# Relative RMS error of any graph output against the fp32 graph. Why 0.1 (measured, README "INT8"): the
# graph outputs of passing builds measure 1-5% (bundled model, tiny and small presets); an absurd
# range on one layer gives > 30%. End-to-end quality is `verify`'s and `eval`'s gate.
OUTPUT_BOUND = 0.1
# Outputs a kind of request never reads, left out of its samples' parity (name prefixes): text-to-image's
# Euler step reads the LLM's hidden states only, never its logits (those of an image position, which no
# step samples from; measured on the bundled model, they move 12% under INT8 where the hidden states
# move 2%) nor the step tokens' new K/V (`new.*`: they never enter the cache, and are not fetched).
UNREAD = {"generate": ("logits", "new.")}
Progress = Callable[[str], None]


class Int8ParityError(UserError):
    pass


class Int8OperatorError(UserError):
    pass


@dataclass
class Int8Graph:
    file: GraphFile  # the manifest's file record, the file name relative to staging
    cache: dict  # this graph's calibration.json entry
    calibrated: bool  # False: the ranges came from the cache


class Samples:
    """At most `cap` feeds per (graph, phase), spread evenly over the calls: keep every stride-th call,
    halving the kept ones and doubling the stride when full (bounded memory, no call count needed)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.kept: dict[tuple[str, str], list] = {}
        self.stride: dict[tuple[str, str], int] = {}
        self.count: dict[tuple[str, str], int] = {}

    def add(self, key: tuple[str, str], feeds) -> None:
        n = self.count.get(key, 0)
        self.count[key] = n + 1
        stride = self.stride.setdefault(key, 1)
        if n % stride:
            return
        kept = self.kept.setdefault(key, [])
        kept.append(feeds)
        if len(kept) > self.cap:
            self.kept[key] = kept[::2]
            self.stride[key] = stride * 2

    def of(self, graph: str) -> list[tuple[str, dict]]:
        """(phase, feeds) of `graph`'s samples."""
        return [(phase, f) for (g, phase), feeds in sorted(self.kept.items()) if g == graph for f in feeds]


def files_runtime(bundle: ModelBundle, limits: Limits, files: dict[str, Path], precision: str = "fp32"):
    """A runtime over ONNX Runtime sessions of `files` (graph name -> path, any folder), its engines
    labelled `precision` (the bounds `verify` holds them to)."""
    from jfexport.runtime.backends.ort_backend import OrtEngine
    from jfexport.runtime.engines_folder import EngineSet
    from jfexport.runtime.pipelines import JanusFlowRuntime

    engines = EngineSet({n: OrtEngine(n, p) for n, p in files.items()}, precision, "cpu", {}, Path())
    latent = bundle.latent_size
    return JanusFlowRuntime(engines, bundle.require_processor(), (bundle.latent_channels, latent, latent),
                            bundle.config.image_grid(latent), bundle.image_size, limits.max_seq, limits.max_batch,
                            "onnxruntime", torch_threads=1)


def record_requests(bundle: ModelBundle, limits: Limits, fp32_files: dict[str, Path], recipe: Recipe,
                    observers: dict[str, RangeObserver], samples: Samples | None, check_only: bool) -> None:
    """Run the recipe's requests (all, or the parity part) through the fp32 graphs, feeding what each
    quantized graph receives to its range observer and to `samples`."""
    runtime = files_runtime(bundle, limits, {n: p for n, p in fp32_files.items() if n != "vae_decoder"})
    phase = ["generate"]

    def observe(name: str, feeds) -> None:
        if name in observers:
            observers[name].observe(feeds)
        if samples is not None and name in QUANTIZED_GRAPHS:
            samples.add((name, phase[0]), feeds)

    try:
        for name in list(runtime.engines):
            if name in QUANTIZED_GRAPHS:
                runtime.engines[name] = Recorder(runtime.engines[name], observe)  # in place: the scheduler shares it
        run_requests(runtime, recipe, bundle.image_size, check_only, limits.max_batch,
                     on_phase=lambda p: phase.__setitem__(0, p))
    finally:
        runtime.close()


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as served: fused INT8 kernels
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def output_parity(int8_path: Path, fp32_path: Path, samples: list[tuple[str, dict]]) -> tuple[float, str]:
    """(worst relative RMS error over outputs and samples, its output) of the INT8 graph against fp32,
    over the outputs each sample's request reads (UNREAD)."""
    got_sess, ref_sess = _session(int8_path), _session(fp32_path)
    inputs = [i.name for i in ref_sess.get_inputs()]
    outputs = [o.name for o in ref_sess.get_outputs()]
    worst, worst_name = 0.0, ""
    for phase, feeds in samples:
        np_feeds = numpy_feeds(feeds, inputs)
        for name, got, ref in zip(outputs, got_sess.run(outputs, np_feeds), ref_sess.run(outputs, np_feeds)):
            if name.startswith(UNREAD.get(phase, ())):
                continue
            got = meaningful(name, torch.from_numpy(np.asarray(got)), feeds).double()
            ref = meaningful(name, torch.from_numpy(np.asarray(ref)), feeds).double()
            if ref.numel() == 0:
                continue
            err = ((got - ref).norm() / _cache_norm(name, ref, feeds).clamp_min(1e-12)).item()
            err = err if math.isfinite(err) else math.inf
            if err > worst or not worst_name:
                worst, worst_name = err, name
    return worst, worst_name


def _cache_norm(name: str, ref: torch.Tensor, feeds: dict) -> torch.Tensor:
    """The norm an output's error is relative to. A decode step's `new.*` K/V are measured against the
    cache row the next step reads, past and new together (what format-1 graphs returned as `present.*`,
    whose past columns were exact copies): the bound keeps its meaning across the contract change. The
    new columns alone are noisier (tiny preset: 15% for layer 1's keys), which the end-to-end gate
    (`verify`'s greedy tokens and logits) judges."""
    if not name.startswith(f"{NEW}."):
        return ref.norm()
    past = feeds[PAST + name[len(NEW):]].double()
    mask = feeds["attention_mask"].bool()[:, : past.shape[2]]
    return (ref.norm() ** 2 + past.transpose(1, 2)[mask].norm() ** 2).sqrt()


def quantize_graph(name: str, fp32_path: Path, out_path: Path, layers: list[Layer], ranges: dict[str, float],
                   samples: list[tuple[str, dict]], threshold: float, bound: float = OUTPUT_BOUND,
                   external_from: int = EXTERNAL_DATA_FROM) -> tuple[dict, list[LayerError], list[str]]:
    """Write `out_path` (the INT8 graph, with external data beside it past `external_from` bytes of
    tensors) from `fp32_path`; raises unless it passes the TensorRT check and the parity bound.
    Returns its parity record, the per-layer table and the external-data file names."""
    activations = Activations(fp32_path, layers)
    table = layer_errors(activations, layers, ranges, [feeds for _, feeds in samples], threshold)
    quantized = [layer for layer, row in zip(layers, table) if row.quantized]
    model = insert_qdq(onnx.load(str(fp32_path)), quantized, ranges)
    findings = check_model(model)
    if findings:
        raise Int8OperatorError(f"{name} [int8]: TensorRT cannot parse: " + "; ".join(map(str, findings[:5])))
    extra = save_graph(model, out_path, external_from)
    onnx.checker.check_model(str(out_path), full_check=False)  # path-based: works with external data
    err, output = output_parity(out_path, fp32_path, samples)
    if not err <= bound:
        rows = [r for r in table if r.quantized]
        worst = max(rows, key=lambda r: r.rel_error) if rows else None
        for written in (out_path, *(out_path.parent / e for e in extra)):
            written.unlink()
        blame = f"layer {worst.layer} (input {worst.activation!r}) has the largest INT8 error, {worst.rel_error:.3g}" \
            if worst else "no layer is quantized"
        raise Int8ParityError(f"{name} [int8]: output {output!r} is {err:.3g} off the fp32 graph (relative RMS, bound "
                              f"{bound}) on held-in calibration samples; {blame}: the INT8 graph is not written")
    parity = {"max_rel_rms": err, "worst_output": output, "samples": len(samples), "bound": bound, "ok": True}
    return parity, table, extra


def build_int8(bundle: ModelBundle, limits: Limits, fp32_files: dict[str, Path], names: list[str],
               weights: dict[str, str], staging: Path, cached: dict[str, dict], recipe: Recipe = Recipe(),
               progress: Progress = lambda msg: None) -> dict[str, Int8Graph]:
    """INT8 graphs of `names` (stale graphs of QUANTIZED_GRAPHS) into `staging`; `fp32_files` has every graph."""
    layers, activations, keys = {}, {}, {}
    for name in names:
        found = linear_layers(onnx.load(str(fp32_files[name]), load_external_data=False))
        layers[name] = [layer for layer in found if not any(k in layer.name for k in KEEP_FP32)]
        activations[name] = sorted({layer.activation for layer in layers[name]})
        keys[name] = cache_key(weights[name], recipe.key())
    to_calibrate = [n for n in names if not usable(cached.get(n), keys[n], activations[n])]
    observers = {n: RangeObserver(Activations(fp32_files[n], layers[n])) for n in to_calibrate}
    start = time.perf_counter()
    if to_calibrate:
        captions, _, questions = requests(recipe, bundle.image_size, check_only=False)
        progress(f"int8: calibrating {', '.join(to_calibrate)} on {len(captions)} prompts and {len(questions)} "
                 "questions (training scenes)")
        record_requests(bundle, limits, fp32_files, recipe, observers, None, check_only=False)
    for n in names:
        if n not in to_calibrate:
            progress(f"{n} [int8]: calibration ranges from the cache")
    samples = Samples(recipe.samples_per_graph)
    record_requests(bundle, limits, fp32_files, recipe, {}, samples, check_only=True)
    progress(f"int8: requests recorded in {time.perf_counter() - start:.1f}s")
    result = {}
    for name in names:
        if name in observers:
            ranges = observers[name].amax
            cache: dict[str, Any] = {"key": keys[name], "ranges": ranges, "calls": observers[name].calls}
        else:
            cache = cached[name]
            ranges = cache["ranges"]
        path = staging / f"{name}.int8.onnx"
        parity, table, extra = quantize_graph(name, fp32_files[name], path, layers[name], ranges, samples.of(name),
                                              recipe.layer_threshold)
        kept = [r.layer for r in table if not r.quantized]
        progress(f"{name} [int8]: {len(table) - len(kept)}/{len(table)} layers INT8, rel RMS {parity['max_rel_rms']:.2e} "
                 f"({parity['worst_output']}), kept fp32: {', '.join(kept) or 'none'}")
        info = GraphFile.recorded(staging, path.name, list(extra), parity, layers=[r.to_json() for r in table])
        result[name] = Int8Graph(info, cache, name in observers)
    return result
