"""TensorRT: planning logic on CPU; the engine build and backend where TensorRT and a GPU exist."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from jfexport.reference.bundle import load_preset
from jfexport.runtime.batching.torch_step import prompt_bucket
from jfexport.runtime.trt_plan import engine_file_name, engine_is_current, stale_engine_reason

from jfexport.core.manifest import EngineRecord, GraphFile, GraphRecord, SpecRecord
from jfexport.core.profiles import optimization_profiles, select_profile

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module")
def specs():
    return {n: SpecRecord.from_json(s.to_json()) for n, s in load_preset("tiny").graph_specs().items()}


def test_decode_has_an_understanding_and_a_generation_profile(specs):
    spec = specs["llm_decode"]
    understanding, generation = optimization_profiles("llm_decode", spec)
    t_max = spec.dims["T"].max
    assert understanding["inputs_embeds"][0][1] == understanding["inputs_embeds"][2][1] == 1
    assert generation["inputs_embeds"][0][1] == generation["inputs_embeds"][2][1] == t_max
    max_seq = spec.dims["P"].max + 1
    # Past + step tokens never exceed the sequence the build allows, in either profile.
    assert generation["attention_mask"][2][1] == max_seq and understanding["attention_mask"][2][1] == max_seq
    assert understanding["past.0.key"][0][2] == 0 and generation["past.0.key"][0][2] == 1


def test_profiles_cover_the_cfg_batch_and_the_runtime_picks_the_right_one(specs):
    profiles = optimization_profiles("llm_decode", specs["llm_decode"])
    kv = lambda b, p: (b, 4, p, 16)  # noqa: E731 - tiny preset: 4 KV heads of 16
    step = {"inputs_embeds": (2, 1, 64), "attention_mask": (2, 31), "position_ids": (2, 1)}
    step.update({f"past.{i}.{x}": kv(2, 30) for i in range(2) for x in ("key", "value")})
    assert select_profile(profiles, step) == 0
    gen_t = specs["llm_decode"].dims["T"].max
    step = {"inputs_embeds": (16, gen_t, 64), "attention_mask": (16, 20 + gen_t), "position_ids": (16, gen_t)}
    step.update({f"past.{i}.{x}": kv(16, 20) for i in range(2) for x in ("key", "value")})
    assert select_profile(profiles, step) == 1
    with pytest.raises(ValueError, match="no optimisation profile"):
        select_profile(profiles, {**step, "inputs_embeds": (17, gen_t, 64)})
    (prefill,) = optimization_profiles("llm_prefill", specs["llm_prefill"])
    assert prefill["inputs_embeds"][2][0] == 16  # 8 images x 2 CFG rows


def test_engine_names_and_staleness():
    name = engine_file_name("llm_decode", "fp16", "10.15.1", "9.0")
    assert name == "llm_decode.fp16.trt10.15.1.sm90.engine"
    engine = EngineRecord(name, "0" * 64, "10.15.1", "9.0", "a" * 64, 2)
    info = GraphFile("llm_decode.fp16.onnx", "a" * 64, 1, [], {}, engine=engine)
    assert engine_is_current(info, "a" * 64, "10.15.1", "9.0")
    assert not engine_is_current(info, "b" * 64, "10.15.1", "9.0")
    assert "TensorRT 10.15.1" in stale_engine_reason(engine, "11.4.0", "9.0")
    assert "compute capability 9.0" in stale_engine_reason(engine, "10.15.1", "8.9")
    assert stale_engine_reason(engine, "10.15.1", "9.0") is None


def test_prompt_buckets():
    assert [prompt_bucket(n, 4096) for n in (1, 16, 17, 100, 4000)] == [16, 16, 32, 128, 4096]
    with pytest.raises(ValueError, match="exceeds"):
        prompt_bucket(5000, 4096)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_build_and_runtime_match_the_reference(tmp_path):
    from jfexport.export.build import build
    from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
    from jfexport.runtime.pipelines import JanusFlowRuntime

    build(load_preset("tiny"), tmp_path, fp16=True, backend="tensorrt")
    runtime = JanusFlowRuntime.from_engines(tmp_path, backend="tensorrt")
    z = runtime.generate_latents(["a red circle"], steps=4, seed=1).cpu()
    ref = ReferencePipeline(load_preset("tiny")).generate_latents(["a red circle"], steps=4, seed=1)
    assert torch.isfinite(z).all() and (z - ref).abs().max().item() < 5e-2


def test_every_typed_graph_gets_its_own_engine_and_the_runtime_opens_the_one_it_checked():
    from jfexport.export.tensorrt_build import engine_precisions

    assert engine_precisions({"fp32": {}, "fp16": {}, "int8": {}}) == ["fp16", "int8"]
    assert engine_precisions({"fp32": {}}) == ["fp32"]  # the VAE, an fp32-only build
    graph = GraphRecord(SpecRecord([], [], {}), "0" * 64, {"fp32": GraphFile("a.onnx", "a" * 64, 1, [], {}),
                                                          "int8": GraphFile("a.int8.onnx", "b" * 64, 1, [], {})})
    assert graph.served("int8").file == "a.int8.onnx"
    assert graph.served("fp16").file == "a.onnx"  # no fp16 graph: served from fp32
