"""`jfexport build` (reuse, staleness), the runtime over built engines, `verify`, bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from jfexport.export.build import build
from jfexport.reference.bundle import load_preset
from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

from jfexport.core.errors import InputError
from jfexport.core.manifest import FORMAT, EnginesError

from .conftest import run_cli


@pytest.fixture(scope="module")
def built(tiny_build):
    return tiny_build


def test_second_build_reuses_everything_and_a_changed_weight_rebuilds_one_graph(built, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(built, out)
    assert build(load_preset("tiny"), out).rebuilt == []
    bundle = load_preset("tiny")
    with torch.no_grad():
        bundle.model.vision_gen_enc_aligner.bias.add_(0.5)
    assert build(bundle, out).rebuilt == ["gen_encoder"]
    (out / "llm_decode.onnx").write_bytes(b"corrupted")  # a damaged file is never trusted
    assert build(load_preset("tiny"), out).rebuilt == ["llm_decode", "gen_encoder"]


def test_runtime_over_onnxruntime_matches_the_reference(built):
    runtime = JanusFlowRuntime.from_engines(built)
    assert runtime.backend == "onnxruntime"
    reference = ReferencePipeline(load_preset("tiny"))
    prompts = ["a red circle at the top left", "a star"]
    z_rt = runtime.generate_latents(prompts, n=2, steps=4, seed=3)
    z_ref = reference.generate_latents(prompts, n=2, steps=4, seed=3)
    assert (z_rt - z_ref).abs().max().item() < 1e-4
    images = [Image.new("RGB", (40, 60), (0, 200, 0)), Image.new("RGB", (60, 40), (0, 0, 200))]
    questions = ["What colour is the shape?", "Where?"]
    a = torch.stack(list(runtime.chat_stream(images, questions, max_new_tokens=6)))
    b = torch.stack(list(reference.chat_stream(images, questions, max_new_tokens=6)))
    assert torch.equal(a, b)
    assert len(runtime.generate(["a blue star"], steps=2)) == 1


def test_requests_beyond_the_built_limits_are_refused(built):
    runtime = JanusFlowRuntime.from_engines(built)
    # Images beyond one engine call go through in several; questions of one call and lengths do not.
    assert runtime.generate_latents(["x"], n=runtime.max_rows // 2 + 1, steps=1).shape[0] == runtime.max_rows // 2 + 1
    image = Image.new("RGB", (8, 8))
    with pytest.raises(InputError, match="batch rows"):
        runtime.chat([image] * (runtime.max_rows + 1), ["x"] * (runtime.max_rows + 1), max_new_tokens=1)
    with pytest.raises(InputError, match="at most"):
        list(runtime.chat_stream([image], ["x"], max_new_tokens=5000))


def test_broken_build_folders_are_named(built, tmp_path):
    with pytest.raises(EnginesError, match="does not exist"):
        JanusFlowRuntime.from_engines(tmp_path / "missing")
    with pytest.raises(EnginesError, match="no manifest.json"):
        JanusFlowRuntime.from_engines(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(built, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["format"] = "jfexport-manifest/0"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EnginesError, match="rebuild"):
        JanusFlowRuntime.from_engines(other)
    manifest["format"] = FORMAT
    (other / "manifest.json").write_text(json.dumps(manifest))
    (other / "gen_decoder.onnx").unlink()
    with pytest.raises(EnginesError, match="gen_decoder.onnx"):
        JanusFlowRuntime.from_engines(other)


def test_verify_cli_passes_and_detects_foreign_weights(built, tmp_path):
    res = run_cli("verify", "--engines", str(built), "--steps", "30")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "latent max abs (30 steps)" in res.stdout and "greedy tokens identical" in res.stdout
    # Progress on stderr, step by step: hashing, then each side's run.
    assert [line.split(":")[0] for line in res.stderr.splitlines()] == [str(built), "loading the reference model",
                                                                       "the engines (fp32)", "the reference"], res.stderr
    other = tmp_path / "other"
    shutil.copytree(built, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "preset:tiny:seed1"
    (other / "manifest.json").write_text(json.dumps(manifest))
    res = run_cli("verify", "--engines", str(other), "--steps", "2")
    assert res.returncode != 0 and "other weights" in res.stderr


def test_generate_and_chat_cli_over_engines(built, tmp_path):
    res = run_cli("generate", "a red circle", "--engines", str(built), "--steps", "2", "-o", str(tmp_path))
    assert res.returncode == 0, res.stderr
    res = run_cli("chat", "--engines", str(built), "--image", str(tmp_path / "image_0.png"), "what?", "--max-new-tokens", "3")
    assert res.returncode == 0, res.stderr
    res = run_cli("generate", "x", "--backend", "onnxruntime", "--engines", str(tmp_path / "none"), "-o", str(tmp_path))
    assert res.returncode != 0 and "does not exist" in res.stderr
    res = run_cli("build", "--backend", "tensorrt", "--out", str(tmp_path / "trt"))
    assert res.returncode != 0 and "TensorRT is not installed" in res.stderr
