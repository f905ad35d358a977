"""Runtime pipelines over the torch backend (engine path and fast executors) equal the reference
pipelines; the fast torch paths."""

from __future__ import annotations

import pytest
import torch
from jfexport.reference.bundle import load_preset
from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

PROMPTS = ["a red circle at the top left", "a blue star"]


def _runtime(tiny_bundle, fast: bool) -> JanusFlowRuntime:
    # The fast executors switch their model to SDPA: they get a copy of the preset, not the shared fixture.
    return JanusFlowRuntime.from_bundle(load_preset("tiny"), fast=True) if fast else JanusFlowRuntime.from_bundle(tiny_bundle)


@pytest.mark.parametrize("fast", [False, True], ids=["engine_path", "fast_executors"])
def test_generation_matches_the_reference(tiny_bundle, fast):
    ref = ReferencePipeline(tiny_bundle).generate_latents(PROMPTS, n=2, steps=3, seed=5)
    rt = _runtime(tiny_bundle, fast).generate_latents(PROMPTS, n=2, steps=3, seed=5)
    assert (ref - rt).abs().max().item() < 1e-5


@pytest.mark.parametrize("fast", [False, True], ids=["engine_path", "fast_executors"])
def test_understanding_matches_the_reference(tiny_bundle, fast):
    images = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (30, 60), (10, 10, 200))]
    questions = ["What colour is the shape?", "Where?"]
    ref = ReferencePipeline(tiny_bundle).chat_stream(images, questions, max_new_tokens=20)
    rt = _runtime(tiny_bundle, fast).chat_stream(images, questions, max_new_tokens=20)
    assert torch.equal(torch.stack(list(ref)), torch.stack(list(rt)))


def test_fast_sampler_matches_the_reference(tiny_bundle):
    from jfexport.core.images import initial_noise
    from jfexport.tools.torch_paths import FastSampler

    ref = ReferencePipeline(tiny_bundle).generate_latents(PROMPTS, steps=3, seed=4)
    batch = tiny_bundle.processor.generation_tokens(PROMPTS)
    size = tiny_bundle.latent_size
    z0 = initial_noise((2, 4, size, size), 4, torch.float32)
    model = tiny_bundle.model
    model.attention = "sdpa"
    try:
        fast = FastSampler(model, tiny_bundle.config.image_grid(size)).sample(
            batch.input_ids, batch.attention_mask, z0, 3, 2.0, tiny_bundle.processor.tokenizer.pad_id)
    finally:
        model.attention = "math"
    assert (ref - fast).abs().max().item() < 1e-5


def _understanding_inputs(bundle, device="cpu"):
    image = Image.new("RGB", (64, 64), (0, 120, 255))
    batch = bundle.processor.understanding_batch(["What colour is it?", "Where?"], [image, image])
    with torch.no_grad():
        embeds = bundle.model.prepare_inputs_embeds(batch.input_ids.to(device), batch.pixel_values.to(device),
                                                    batch.images_seq_mask.to(device), batch.images_emb_mask.to(device))
    return embeds, batch.attention_mask.to(device)


def test_static_kv_decoder_matches_the_reference(tiny_bundle):
    from jfexport.reference.pipelines.understanding import decode_tokens

    from jfexport.tools.torch_paths import FastDecoder

    model = tiny_bundle.model
    embeds, mask = _understanding_inputs(tiny_bundle)
    eos = tiny_bundle.processor.tokenizer.eos_id
    want_logits, got_logits = [], []
    with torch.no_grad():
        want = list(decode_tokens(model, embeds, mask, 12, eos, on_logits=want_logits.append))
    got = list(FastDecoder(model).decode(embeds, mask, 12, eos, on_logits=got_logits.append))
    assert torch.equal(torch.stack(want), torch.stack(got))
    assert max((a - b).abs().max().item() for a, b in zip(want_logits, got_logits)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_kv_decoder_cuda_graph_matches_eager():
    from jfexport.reference.bundle import load_preset

    from jfexport.tools.torch_paths import FastDecoder

    bundle = load_preset("tiny")
    bundle.model.to("cuda")
    embeds, mask = _understanding_inputs(bundle, "cuda")
    eos = bundle.processor.tokenizer.eos_id
    eager = torch.stack(list(FastDecoder(bundle.model).decode(embeds, mask, 12, eos)))
    graphed = FastDecoder(bundle.model, cuda_graphs=True)
    for _ in range(2):  # the second request replays the graph captured by the first
        assert torch.equal(torch.stack(list(graphed.decode(embeds, mask, 12, eos))), eager)
    assert len(graphed.executor._chunks) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_matches_eager_and_is_reused():
    from jfexport.reference.bundle import load_preset

    from jfexport.core.images import initial_noise
    from jfexport.tools.torch_paths import FastSampler

    bundle = load_preset("tiny")
    model = bundle.model.to("cuda")
    model.attention = "sdpa"
    batch = bundle.processor.generation_tokens(PROMPTS)
    size = bundle.latent_size
    grid = bundle.config.image_grid(size)
    eager, graphed = FastSampler(model, grid), FastSampler(model, grid, cuda_graphs=True)
    whole = FastSampler(model, grid, whole_loop=True)
    pad = bundle.processor.tokenizer.pad_id
    for seed in (1, 2):  # the second request replays the graphs captured by the first
        z0 = initial_noise((2, 4, size, size), seed, torch.float32).cuda()
        want = eager.sample(batch.input_ids, batch.attention_mask, z0, 4, 2.0, pad)
        got = graphed.sample(batch.input_ids, batch.attention_mask, z0, 4, 2.0, pad)
        assert (want - got).abs().max().item() < 1e-4
        got = whole.sample(batch.input_ids, batch.attention_mask, z0, 4, 2.0, pad)
        assert (want - got).abs().max().item() < 1e-4
    assert len(graphed.executor._buffers) == 1 and len(whole._loops) == 1
    assert all(b.graph is not None for b in graphed.executor._buffers._items.values())
    assert all(b.graph is not None for b, _ in whole._loops._items.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runtime_on_cuda_matches_cpu():
    from jfexport.reference.bundle import load_preset

    cpu = JanusFlowRuntime.from_bundle(load_preset("tiny"))
    gpu = JanusFlowRuntime.from_bundle(load_preset("tiny"), device="cuda")
    want = cpu.generate_latents(PROMPTS, steps=3, seed=2)
    got = gpu.generate_latents(PROMPTS, steps=3, seed=2)
    assert (want - got.cpu()).abs().max().item() < 1e-4
    assert len(gpu.decode_images(got)) == len(PROMPTS)
    image = Image.new("RGB", (64, 64), (0, 120, 255))
    questions = ["What colour is it?", "Where is it?"]
    assert gpu.chat([image, image], questions, max_new_tokens=8) == cpu.chat([image, image], questions, max_new_tokens=8)
    sampled = [gpu.chat([image], questions[:1], max_new_tokens=8, temperature=0.8, seed=5) for _ in range(2)]
    assert sampled[0] == sampled[1]
