"""`jfexport build --int8` on the tiny preset: calibration, Q/DQ structure, parity bounds, the
calibration cache, refusal of a failing layer, the TensorRT check, and the runtime at int8."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from jfexport.export.build import build, build_limits
from jfexport.export.manifest import sha256_file
from jfexport.export.quantize.cache import CACHE_FILE
from jfexport.export.quantize.int8_build import (OUTPUT_BOUND, QUANTIZED_GRAPHS, Int8ParityError, Samples,
                                                 quantize_graph, record_requests)
from jfexport.export.quantize.qdq import linear_layers
from jfexport.export.quantize.requests import Recipe, requests
from jfexport.export.trt_ops import check_explicit_quantization, check_file
from jfexport.reference.bundle import load_bundle, load_preset
from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
from jfexport.reference.training.toy_data import split_scenes
from jfexport.runtime.engines_folder import EnginesError, load_engines, pick_precision
from jfexport.runtime.pipelines import JanusFlowRuntime
from jfexport.runtime.verify import verify


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    manifest = build(load_preset("tiny"), out, int8=True)
    return out, manifest


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


def test_linear_layers_are_qdq_with_per_channel_symmetric_int8_weights(built):
    out, manifest = built
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
            assert np.abs(numpy_helper.to_array(weight)).max() <= 127
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
    for name in QUANTIZED_GRAPHS:
        parity = manifest["graphs"][name]["files"]["int8"]["parity"]
        assert 0 < parity["max_rel_rms"] <= OUTPUT_BOUND and parity["samples"] > 0
    engines, _, _ = load_engines(out, precision="int8")
    assert engines.precision == "int8"
    assert engines.files["vision_encoder"][0].file.name == "vision_encoder.onnx"  # no INT8 file: fp32 served
    assert engines.files["llm_decode"][0].file.name == "llm_decode.int8.onnx"


def test_verify_holds_the_bundled_models_int8_engines_to_the_int8_bounds(tmp_path):
    # The bundled (trained) model: the tiny preset's random weights have near-tied logits, where greedy
    # tokens flip by chance (runtime/verify.py).
    bundle = load_bundle()
    build(bundle, tmp_path, int8=True)
    runtime = JanusFlowRuntime.from_engines(tmp_path, precision="int8")
    try:
        checks = verify(runtime, ReferencePipeline(load_bundle()), steps=30)
    finally:
        runtime.close()
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    by_name = {c.name: c for c in checks}
    assert by_name["precision (as loaded)"].value == "int8"
    assert by_name["latent rel RMS"].value > 0 and by_name["image PSNR (dB)"].value < 100  # INT8 is not fp32
    assert {"no NaN/Inf", "greedy token agreement (64)", "logits rel max (agreeing)"} <= set(by_name)


def test_a_rebuild_takes_the_ranges_from_the_cache(built, tmp_path):
    src, manifest = built
    out = tmp_path / "b"
    shutil.copytree(src, out)
    cache = out / CACHE_FILE
    before = (cache.read_bytes(), cache.stat().st_mtime_ns)
    original = manifest["graphs"]["llm_decode"]["files"]["int8"]["sha256"]
    (out / "llm_decode.int8.onnx").write_bytes(b"damaged")
    again = build(load_preset("tiny"), out, int8=True)
    assert again["rebuilt"] == ["llm_decode"]
    assert again["calibration"]["calibrated"] == []
    assert (cache.read_bytes(), cache.stat().st_mtime_ns) == before
    assert sha256_file(out / again["graphs"]["llm_decode"]["files"]["int8"]["file"]) == original
    # A build without --int8 drops the INT8 files and the cache from the folder.
    plain = build(load_preset("tiny"), out)
    assert plain["precisions"] == ["fp32"] and "calibration" not in plain
    assert not cache.exists() and not list(out.glob("**/*.int8.onnx"))
    with pytest.raises(EnginesError, match="--int8"):
        pick_precision(plain, "int8", "cpu")


def test_a_layer_whose_error_breaks_the_graph_is_named_and_nothing_is_written(built, tmp_path):
    out, manifest = built
    bundle = load_preset("tiny")
    fp32 = {n: out / e["files"]["fp32"]["file"] for n, e in manifest["graphs"].items()}
    samples = Samples(Recipe().samples_per_graph)
    record_requests(bundle, build_limits(bundle), fp32, Recipe(), {}, samples, check_only=True)
    ranges = json.loads((out / CACHE_FILE).read_text())["graphs"]["gen_decoder"]["ranges"]
    layers = linear_layers(onnx.load(str(fp32["gen_decoder"])))
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
