"""`jfexport build --int8`: calibration, Q/DQ structure, parity bounds, the end-to-end gate, the
calibration cache, refusal of a failing layer, the TensorRT check, the CPU record, and the runtime
at int8. Two builds per module: the tiny preset (random weights, near-tied logits: the gate keeps
graphs fp32) and the bundled trained model (every quantized graph in INT8)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
from jfexport.export.build import build, build_limits
from jfexport.export.quantize.cache import CACHE_FILE
from jfexport.export.quantize.int8_build import (
    OUTPUT_BOUND,
    QUANTIZED_GRAPHS,
    Int8ParityError,
    Samples,
    quantize_graph,
    record_requests,
)
from jfexport.export.quantize.int8_gate import Int8GateError, end_to_end_gate
from jfexport.export.quantize.qdq import linear_layers
from jfexport.export.quantize.requests import Recipe, requests
from jfexport.export.trt_ops import check_explicit_quantization, check_file
from jfexport.reference.bundle import load_bundle, load_preset
from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
from jfexport.reference.training.toy_data import split_scenes
from jfexport.runtime.engines_folder import load_engines, pick_precision
from jfexport.runtime.int8_arithmetic import LEGACY_WEIGHT_MAX, MATMUL_TOLERANCE, WEIGHT_MAX, describe_cpu, matmul_error
from jfexport.runtime.pipelines import JanusFlowRuntime
from onnx import numpy_helper

from jfexport.core.manifest import EnginesError, Manifest, sha256_file
from jfexport.tools.verify import verify

from .conftest import copy_build


# Each INT8 build starts from a copy of the suite's fp32 build of the same model: its fp32 graphs are
# reused, so the fixture runs calibration and quantization only.
@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_build):
    out = tmp_path_factory.mktemp("int8") / "engines"
    copy_build(tiny_build, out)
    return out, build(load_preset("tiny"), out, int8=True).to_json()


@pytest.fixture(scope="module")
def bundled(tmp_path_factory, default_build):
    out = tmp_path_factory.mktemp("int8-bundled") / "engines"
    copy_build(default_build, out)
    return out, build(load_bundle(), out, int8=True).to_json()


@pytest.fixture(scope="module")
def decoder_case(built):
    """(bundle, fp32 graph files, held-in samples, gen_decoder's calibrated ranges, its linear layers) of the tiny build."""
    out, manifest = built
    bundle = load_preset("tiny")
    fp32 = {n: out / e["files"]["fp32"]["file"] for n, e in manifest["graphs"].items()}
    samples = Samples(Recipe().samples_per_graph)
    record_requests(bundle, build_limits(bundle), fp32, Recipe(), {}, samples, check_only=True)
    ranges = json.loads((out / CACHE_FILE).read_text())["graphs"]["gen_decoder"]["ranges"]
    return bundle, fp32, samples, ranges, linear_layers(onnx.load(str(fp32["gen_decoder"])))


def _verify(out, reference_bundle) -> dict:
    runtime = JanusFlowRuntime.from_engines(out, precision="int8")
    try:
        checks = verify(runtime, ReferencePipeline(reference_bundle), steps=30)
    finally:
        runtime.close()
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    return {c.name: c for c in checks}


def _graph(out, manifest, name, precision="int8") -> onnx.ModelProto:
    return onnx.load(str(out / manifest["graphs"][name]["files"][precision]["file"]))


def test_calibration_runs_on_training_scenes_and_records_a_range_for_every_layer(built):
    out, manifest = built
    assert manifest["precisions"] == ["fp32", "int8"]
    assert sorted(manifest["calibration"]["calibrated"]) == sorted(QUANTIZED_GRAPHS)
    _, held_out = split_scenes(Recipe().seed)
    captions, _, _ = requests(Recipe(), 64, check_only=False)
    assert captions and not set(captions) & {s.caption for s in held_out}
    cache = json.loads((out / manifest["calibration"]["file"]).read_text())
    for name in QUANTIZED_GRAPHS:
        layers = linear_layers(_graph(out, manifest, name, "fp32"))
        ranges = cache["graphs"][name]["ranges"]
        assert {layer.activation for layer in layers} <= set(ranges)
        assert all(math.isfinite(v) and v > 0 for v in ranges.values())
        assert cache["graphs"][name]["calls"] > 0


def test_linear_layers_are_qdq_with_per_channel_symmetric_int8_weights(bundled):
    out, manifest = bundled
    for name in QUANTIZED_GRAPHS:
        model = _graph(out, manifest, name)
        inits = {i.name: i for i in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        table = manifest["graphs"][name]["files"]["int8"]["layers"]
        quantized = 0
        for node in model.graph.node:
            if node.op_type != "MatMul" or node.input[1] not in producer:
                continue
            wdq, adq = producer[node.input[1]], producer[node.input[0]]
            if wdq.op_type != "DequantizeLinear":
                continue
            quantized += 1
            weight, scale, zero = (inits[i] for i in wdq.input)
            assert weight.data_type == onnx.TensorProto.INT8 and len(weight.dims) == 2
            assert next(a.i for a in wdq.attribute if a.name == "axis") == 1
            assert list(scale.dims) == [weight.dims[1]]  # one scale per output channel
            assert not numpy_helper.to_array(zero).any() and zero.data_type == onnx.TensorProto.INT8
            assert np.abs(numpy_helper.to_array(weight)).max() == WEIGHT_MAX  # within the bound, and using it
            assert adq.op_type == "DequantizeLinear" and producer[adq.input[0]].op_type == "QuantizeLinear"
            assert list(inits[adq.input[1]].dims) == [] and not numpy_helper.to_array(inits[adq.input[2]]).any()
        assert quantized == sum(row["quantized"] for row in table) > 0
        # Time embedding and the LLM head stay fp32 (Gemms), norms and softmax are untouched.
        assert not any("time_embed" in row["layer"] for row in table)
        assert check_file(out / manifest["graphs"][name]["files"]["int8"]["file"]) == []
    for name in ("vision_encoder", "embed_tokens", "vae_decoder"):
        assert set(manifest["graphs"][name]["files"]) == {"fp32"}


def test_the_explicit_quantization_check_rejects_what_tensorrt_would_not_take(built):
    out, manifest = built
    model = _graph(out, manifest, "gen_decoder")
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_int8"))
    zero = next(i for i in model.graph.initializer if i.name == node.input[2])
    zero.CopyFrom(numpy_helper.from_array(np.ones(zero.dims, np.int8), zero.name))
    next(a for a in node.attribute if a.name == "axis").i = 0
    problems = {f.problem.split(" ")[0] for f in check_explicit_quantization(model) if f.node == node.name}
    assert problems == {"zero", "weight"}


def test_int8_graphs_are_within_their_parity_bound_and_serve_fp32_where_they_have_no_int8_file(built):
    out, manifest = built
    kept = manifest["int8"]["gate"]["kept_fp32"]
    for name in QUANTIZED_GRAPHS:
        if name in kept:
            assert "int8" not in manifest["graphs"][name]["files"] and not (out / f"{name}.int8.onnx").exists()
            continue
        parity = manifest["graphs"][name]["files"]["int8"]["parity"]
        assert 0 < parity["max_rel_rms"] <= OUTPUT_BOUND and parity["samples"] > 0
    engines, _, _ = load_engines(out, precision="int8")
    assert engines.precision == "int8"
    assert engines.files["vision_encoder"][0].file.name == "vision_encoder.onnx"  # no INT8 file: fp32 served
    served = {n: engines.files[n][0].file.name for n in QUANTIZED_GRAPHS}
    assert served == {n: f"{n}.onnx" if n in kept else f"{n}.int8.onnx" for n in QUANTIZED_GRAPHS}


def test_the_build_never_commits_int8_engines_that_verify_rejects(built):
    # The tiny preset's random weights have near-tied logits: its LLM in INT8 flips greedy tokens (0.53 of 64
    # agree), so the build's gate keeps the graphs responsible fp32 and what it commits passes `verify`.
    out, manifest = built
    gate = manifest["int8"]["gate"]
    assert gate["ok"] and gate["kept_fp32"], gate
    assert set(gate["failed_alone"]) == set(gate["kept_fp32"])
    assert all(manifest["graphs"][n]["files"].get("int8") for n in QUANTIZED_GRAPHS if n not in gate["kept_fp32"])
    _verify(out, load_preset("tiny"))


def test_verify_holds_the_bundled_models_int8_engines_to_the_int8_bounds(bundled):
    # The bundled (trained) model: every quantized graph passes the gate in INT8 (docs/int8.md has the figures).
    out, manifest = bundled
    assert manifest["int8"]["gate"]["kept_fp32"] == [] and manifest["int8"]["gate"]["ok"]
    by_name = _verify(out, load_bundle())
    assert by_name["precision (as loaded)"].value == "int8"
    assert by_name["latent rel RMS"].value > 0 and by_name["image PSNR (dB)"].value < 100  # INT8 is not fp32
    assert {"no NaN/Inf", "greedy token agreement (64)", "logits rel max (agreeing)"} <= set(by_name)


def test_the_manifest_records_the_weight_bound_and_the_cpu_checked_on(bundled):
    _, manifest = bundled
    record = manifest["int8"]
    assert record["weight_max"] == WEIGHT_MAX and record["arithmetic_rel_rms"] <= MATMUL_TOLERANCE
    assert record["cpu"] == describe_cpu()


def test_the_typed_manifest_reads_an_int8_build_unchanged(built):
    out, manifest = built
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest and Manifest.from_json(on_disk).to_json() == on_disk
    assert on_disk["calibration"]["recipe"] and on_disk["int8"]["gate"]["checks"]  # the open records come back too


def _copy_with_int8_record(src, dst, **changes) -> None:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["int8"].update(changes)
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_int8_engines_are_refused_on_a_cpu_that_does_not_multiply_their_weights_exactly(built, tmp_path):
    out = tmp_path / "b"
    _copy_with_int8_record(built[0], out, weight_max=LEGACY_WEIGHT_MAX,
                           cpu={"machine": "x86_64", "model": "Some Xeon", "isa": "avx512-vnni", "flags": []})
    if matmul_error(LEGACY_WEIGHT_MAX) <= MATMUL_TOLERANCE:  # a CPU with int32 dot products: exact, served
        load_engines(out, precision="int8")
        return
    with pytest.raises(EnginesError) as err:
        load_engines(out, precision="int8")
    message = str(err.value)
    assert describe_cpu()["model"] in message and "jfexport build --int8" in message and "fp32" in message
    assert "Some Xeon (x86_64, avx512-vnni)" in message
    load_engines(out, precision="fp32")  # the fp32 engines of the same folder still serve


@pytest.mark.parametrize("older", [True, False], ids=["format-2", "format-3"])
def test_int8_engines_without_their_weight_scheme_record_are_refused_at_every_precision(built, tmp_path, older):
    """Builds older than the INT8 record had full-range weights: format 2 served them as such, format 3 has the
    record in every INT8 build and refuses a manifest without it."""
    out = tmp_path / "b"
    shutil.copytree(built[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["int8"]
    if older:
        manifest["format"] = "jfexport-manifest/2"
    (out / "manifest.json").write_text(json.dumps(manifest))
    message = (r"format 'jfexport-manifest/2', this runtime reads 'jfexport-manifest/3' \(.*\): rebuild the engines"
               if older else r"manifest\.json: int8: missing")
    for precision in ("int8", "fp32"):
        with pytest.raises(EnginesError, match=message):
            load_engines(out, precision=precision)


def test_int8_engines_of_another_cpu_are_rechecked_and_served(built, tmp_path, caplog):
    out = tmp_path / "b"
    _copy_with_int8_record(built[0], out, cpu={"machine": "aarch64", "model": "Neoverse-V1", "isa": "arm64-dotprod",
                                               "flags": ["asimddp"]})
    with caplog.at_level("INFO", logger="jfexport.runtime.engines_folder"):
        engines, _, _ = load_engines(out, precision="int8")
    assert engines.precision == "int8"
    assert "Neoverse-V1 (aarch64, arm64-dotprod)" in caplog.text and "re-checked, exact" in caplog.text


def test_the_gate_keeps_a_graph_that_fails_alone_fp32_and_refuses_when_none_passes(built, decoder_case, tmp_path):
    out, manifest = built
    bundle, fp32, samples, ranges, layers = decoder_case
    victim = next(layer for layer in layers if layer.name == "vision_gen_dec_aligner")
    # A range 1000x too small clips the aligner's inputs. The layer threshold and the graph's parity bound are
    # disabled here, so only the end-to-end gate stands between this graph and a build.
    broken = tmp_path / "gen_decoder.int8.onnx"
    absurd = {**ranges, victim.activation: ranges[victim.activation] * 1e-3}
    quantize_graph("gen_decoder", fp32["gen_decoder"], broken, layers, absurd, samples.of("gen_decoder"), math.inf,
                   bound=math.inf)
    good = out / manifest["graphs"]["gen_encoder"]["files"]["int8"]["file"]
    result = end_to_end_gate(bundle, build_limits(bundle), fp32, {"gen_encoder": good, "gen_decoder": broken})
    assert result.kept_fp32 == ["gen_decoder"] and all(c.ok for c in result.checks)
    assert {"image PSNR (dB)", "latent rel RMS"} & {c.name for c in result.alone["gen_decoder"] if not c.ok}
    with pytest.raises(Int8GateError, match="every INT8 graph \\(gen_decoder\\) fails"):
        end_to_end_gate(bundle, build_limits(bundle), fp32, {"gen_decoder": broken})


def test_a_rebuild_takes_the_ranges_from_the_cache(built, tmp_path):
    src, manifest = built
    out = tmp_path / "b"
    shutil.copytree(src, out)
    cache = out / CACHE_FILE
    before = (cache.read_bytes(), cache.stat().st_mtime_ns)
    original = manifest["graphs"]["gen_decoder"]["files"]["int8"]["sha256"]
    (out / "gen_decoder.int8.onnx").write_bytes(b"damaged")
    again = build(load_preset("tiny"), out, int8=True)
    assert again.rebuilt == ["gen_decoder"]
    assert again.calibration.calibrated == []
    assert (cache.read_bytes(), cache.stat().st_mtime_ns) == before
    assert sha256_file(out / again.graphs["gen_decoder"].files["int8"].file) == original
    # The graphs the gate kept fp32 are reused as they are, not quantized and gated again.
    assert again.int8.gate.kept_fp32 == manifest["int8"]["gate"]["kept_fp32"]
    # INT8 files of another weight scheme (full-range weights, before the bound) are quantized again, never reused.
    legacy = json.loads((out / "manifest.json").read_text())
    legacy["int8"]["weight_max"] = LEGACY_WEIGHT_MAX
    (out / "manifest.json").write_text(json.dumps(legacy))
    upgraded = build(load_preset("tiny"), out, int8=True)
    # (beside their fp32 files, which stay: only the INT8 step runs again)
    assert upgraded.rebuilt == [] and upgraded.int8.weight_max == WEIGHT_MAX
    assert set(upgraded.added) | set(upgraded.int8.gate.kept_fp32) == set(QUANTIZED_GRAPHS)
    assert all(p == ["int8"] for p in upgraded.added.values())
    # A build without --int8 drops the INT8 files and the cache from the folder.
    plain = build(load_preset("tiny"), out)
    assert plain.precisions == ["fp32"] and plain.calibration is None and plain.int8 is None
    assert not cache.exists() and not list(out.glob("**/*.int8.onnx"))
    with pytest.raises(EnginesError, match="--int8"):
        pick_precision(plain, "int8", "cpu")


def test_a_layer_whose_error_breaks_the_graph_is_named_and_nothing_is_written(decoder_case, tmp_path):
    _, fp32, samples, ranges, layers = decoder_case
    victim = next(layer for layer in layers if layer.name == "vision_gen_dec_aligner")  # every output reads it
    absurd = {**ranges, victim.activation: ranges[victim.activation] * 1e-3}  # clips nearly every value
    target = tmp_path / "gen_decoder.int8.onnx"
    # The layer threshold is disabled, so the bad layer is not kept fp32 and the graph check must catch it.
    with pytest.raises(Int8ParityError, match=f"layer {victim.name} ") as err:
        quantize_graph("gen_decoder", fp32["gen_decoder"], target, layers, absurd, samples.of("gen_decoder"), math.inf)
    assert "gen_decoder [int8]" in str(err.value) and not target.exists()
    # With the recipe's threshold the same bad range is measured and that layer stays fp32. Written with
    # external data here (as graphs past 2 GB are), which ONNX Runtime must find beside the graph.
    parity, table, extra = quantize_graph("gen_decoder", fp32["gen_decoder"], target, layers, absurd,
                                          samples.of("gen_decoder"), Recipe().layer_threshold, external_from=0)
    assert [r.layer for r in table if not r.quantized] == [victim.name] and parity["ok"]
    assert extra == ["gen_decoder.int8.onnx.data"] and (tmp_path / extra[0]).stat().st_size > 0
    assert not any(i.HasField("raw_data") for i in onnx.load(str(target), load_external_data=False).graph.initializer
                   if i.name.endswith("_int8"))
