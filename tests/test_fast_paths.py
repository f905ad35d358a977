"""The fast torch paths under the scheduler (issue 13) hold to the engine path: device-side token
choice and stopping against the reference rule, k-token chunks against one-token steps, the
static-buffer Euler step against the engine step. CPU runs them eagerly; CUDA tests add graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from jfexport.reference.bundle import load_bundle, load_preset
from jfexport.runtime.batching.fast_chat import TorchChatExecutor
from jfexport.runtime.batching.jobs import stream_rows
from jfexport.runtime.batching.torch_generation import TorchGenerationExecutor
from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

from jfexport.core.schedulers import StopRule, row_generators, row_uniforms, sample_next, sample_next_device, stop_rows

# The scheduler's guarantees, rerun below on the fast executors (the `runtime` fixture of this module).
from tests.test_scheduler import (  # noqa: F401 - collected here as tests of the fast path
    Rows,
    test_a_callback_may_call_the_runtime,
    test_a_paused_or_dropped_stream_blocks_nobody_and_frees_its_slot,
    test_a_question_gets_its_first_token_while_images_are_generated,
    test_a_result_does_not_depend_on_its_companions,
    test_cancellation_and_timeouts,
    test_empty_and_bad_requests,
    test_images_join_and_leave_between_steps,
    test_rows_of_one_call_end_in_any_order,
)

PROMPTS = ["a red circle at the top left", "a blue star"]
IMAGES = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (30, 60), (10, 10, 200))]
QUESTIONS = ["What colour is the shape?", "Where?"]


@pytest.fixture(scope="module")
def runtime():
    rt = JanusFlowRuntime.from_bundle(load_bundle(), fast=True)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def pair():
    """(engine path, fast path) over two copies of the tiny preset (the fast path switches its model to SDPA)."""
    plain = JanusFlowRuntime.from_bundle(load_preset("tiny"))
    fast = JanusFlowRuntime.from_bundle(load_preset("tiny"), fast=True)
    yield plain, fast
    plain.close()
    fast.close()


# -- device-side token choice and stopping (jfexport/core/schedulers) --------------------------------

def _truncated(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The top-p distribution [V] written out independently of both samplers."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    out = torch.zeros_like(probs)
    mass = 0.0
    for index in probs.argsort(descending=True).tolist():
        out[index] = probs[index]
        mass += float(probs[index])
        if mass >= top_p:
            break
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (1.5, 0.5)])
def test_device_sampler_draws_from_the_reference_distribution(temperature, top_p):
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3)) * 2
    draws = 20000
    want = _truncated(logits[0], temperature, top_p)
    u = torch.rand(draws, generator=torch.Generator().manual_seed(4))
    device = sample_next_device(logits.expand(draws, -1), torch.full((draws,), temperature), torch.full((draws,), top_p), u)
    gen = torch.Generator().manual_seed(5)
    reference = torch.cat([sample_next(logits, temperature, top_p, gen) for _ in range(draws)])
    freq = {name: torch.bincount(t, minlength=12).double() / draws for name, t in (("device", device), ("ref", reference))}
    assert set(device.tolist()) <= set(torch.nonzero(want).flatten().tolist())  # never outside the top-p set
    # Total variation from the exact distribution: ~0.01 for 20000 draws over 12 tokens.
    assert 0.5 * (freq["device"] - want).abs().sum() < 0.02
    assert 0.5 * (freq["ref"] - want).abs().sum() < 0.02


def test_device_sampler_takes_per_row_settings():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.8])
    top_p = torch.tensor([1.0, 1e-6, 0.5, 1e-6])  # a tiny top_p keeps the top token only
    token = sample_next_device(logits, temperature, top_p, torch.tensor([0.3, 0.999, 0.7, 0.0]))
    assert torch.equal(token, logits.argmax(dim=-1))
    greedy = sample_next_device(logits, torch.zeros(4), top_p, torch.rand(4), all_greedy=True)
    assert torch.equal(greedy, logits.argmax(dim=-1))
    # u close to 1 picks the last kept token, never one past the kept prefix.
    full = sample_next_device(logits[:1], torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0 - 1e-8]))
    assert full.item() == logits[0].argmin().item()


def test_row_uniforms_do_not_depend_on_chunking():
    gens = row_generators(9, 2)
    chunked = torch.cat([row_uniforms(gens, 1), row_uniforms(gens, 8), row_uniforms(gens, 3)], dim=1)
    assert torch.equal(chunked, row_uniforms(row_generators(9, 2), 12))


def test_stop_rows_follows_the_stop_rule():
    eos = 7
    streams = torch.randint(0, 9, (6, 20), generator=torch.Generator().manual_seed(2))
    limits = torch.tensor([20, 5, 1, 12, 3, 20])
    finished = torch.zeros(6, dtype=torch.bool)
    produced = torch.zeros(6, dtype=torch.long)
    got = torch.stack([stop_rows(streams[:, j].clone(), finished, produced, limits, eos) for j in range(20)], dim=1)
    for i in range(6):
        rule, reason, want = StopRule(eos, int(limits[i])), None, []
        for j, token in enumerate(streams[i].tolist()):
            want.append(eos if reason is not None else token)
            reason = reason or rule.finish_reason(token, j + 1)
        assert got[i].tolist() == want
        assert bool(finished[i]) == (reason is not None)


# -- understanding: k tokens per host round trip ---------------------------------------------------

def _stream(rt: JanusFlowRuntime, job) -> torch.Tensor:
    rt.scheduler.submit(job)
    return torch.stack([tokens for tokens, _ in stream_rows(job)])


def test_fast_greedy_tokens_equal_the_engine_path_across_chunks(pair):
    plain, fast = pair
    assert isinstance(fast.scheduler.chat.executor, TorchChatExecutor) and fast.scheduler.chat.executor.chunk == 8
    want_logits, got_logits = [], []
    # 67 tokens: the first from prefill, then 8 chunks of 8 and a last one of 2.
    want = torch.stack(list(plain.chat_stream(IMAGES, QUESTIONS, max_new_tokens=67, on_logits=want_logits.append)))
    got = torch.stack(list(fast.chat_stream(IMAGES, QUESTIONS, max_new_tokens=67, on_logits=got_logits.append)))
    assert got.shape == (67, 2) and torch.equal(want, got)
    assert max((a - b).abs().max().item() for a, b in zip(want_logits, got_logits)) < 1e-4
    executor = fast.scheduler.chat.executor
    assert len(executor._chunks) >= 2 and len(executor.prefills._states) >= 1  # no silent engine fallback


def test_fast_prefill_equals_the_engine_prefill(pair):
    from jfexport.core.graph_contract import kv_name

    plain, fast = pair
    proc = fast.processor
    ids = [proc.understanding_ids(q) for q in QUESTIONS + ["Is there a shape in the picture at all?"]]
    batch = proc.understanding_rows(ids, [proc.pixel_values(IMAGES[i % 2]) for i in range(3)])
    with torch.inference_mode():
        got, got_mask = fast.scheduler.chat.executor.prefills.run(batch)  # 3 rows run as 4, width as 128
        want, want_mask = plain.scheduler.chat.executor.prefill(batch)
    width = want_mask.shape[1]
    assert got_mask.shape == (3, 128) and torch.equal(got_mask[:, -width:], want_mask) and not got_mask[:, :-width].any()
    assert (got["logits"] - want["logits"]).abs().max().item() < 1e-4
    for name in (kv_name("present", 0, "key"), kv_name("present", 1, "value")):
        for i, n in enumerate(want_mask.sum(dim=1).tolist()):  # each row's own columns
            assert (got[name][i, :, -n:] - want[name][i, :, -n:]).abs().max().item() < 1e-4


def test_kept_logits_survive_later_chunks(pair):
    """Logits kept for a caller are read after the request ends here: later chunks (and replays)
    reuse the buffers they came from."""
    kept = []
    for rt in pair:
        job = rt._chat_job(IMAGES, QUESTIONS, 30, 0.0, 1.0, 0, True, None)
        rt.scheduler.submit(job)
        with job.cond:
            job.wait_for(lambda: False)  # until the request ends
        kept.append([torch.stack(r.logits) for r in job.chat_rows])
    for want, got in zip(*kept):
        assert got.shape == want.shape and (got - want).abs().max().item() < 1e-4


def test_eos_in_the_middle_of_a_chunk(pair):
    plain, fast = pair
    greedy = torch.stack(list(plain.chat_stream(IMAGES[:1], QUESTIONS[:1], max_new_tokens=40)))[:, 0].tolist()
    # A token whose first appearance is in the middle of a chunk (tokens 2-9, 10-17, ...) plays EOS.
    at = next(i for i in range(11, 16) if greedy[i] not in greedy[:i])
    streams = []
    for rt in pair:
        job = rt._chat_job(IMAGES, QUESTIONS, 40, 0.0, 1.0, 0, False, None)
        job.rule = StopRule(greedy[at], 40)
        streams.append(_stream(rt, job))
        assert job.chat_rows[0].finish_reason == "stop" and len(job.chat_rows[0].tokens) == at + 1
    assert torch.equal(streams[0], streams[1])
    assert (streams[1][at:, 0] == greedy[at]).all()  # padded with the row's EOS after it ended


def test_fast_sampled_tokens_are_the_device_rule_on_their_logits(pair):
    _, fast = pair
    seen = []
    tokens = torch.stack(list(fast.chat_stream(IMAGES, QUESTIONS, max_new_tokens=20, temperature=0.9, top_p=0.9,
                                               seed=3, on_logits=seen.append)))
    gens = row_generators(3, 2)
    u = row_uniforms(gens, 20)  # row i's j-th token takes its generator's j-th draw, whatever the chunks
    for j, logits in enumerate(seen):
        want = sample_next_device(logits, torch.full((2,), 0.9), torch.full((2,), 0.9), u[:, j])
        assert torch.equal(tokens[j], want)
    again = torch.stack(list(fast.chat_stream(IMAGES, QUESTIONS, max_new_tokens=20, temperature=0.9, top_p=0.9, seed=3)))
    assert torch.equal(tokens, again)


def test_a_chunk_that_raises_runs_on_the_engine_path_with_the_same_draws(pair, monkeypatch, caplog):
    """The torch executor hands a failed chunk (its draws taken) to the engine path: the sampled
    tokens are those of the chunks, not of new draws or of the host sampler."""
    import jfexport.runtime.batching.fast_chat as fast_chat

    _, fast = pair
    want = torch.stack(list(fast.chat_stream(IMAGES, QUESTIONS, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)))

    def broken(forward, state):
        raise RuntimeError("this chunk cannot run")

    monkeypatch.setattr(fast_chat, "run_decode_step", broken)
    got = torch.stack(list(fast.chat_stream(IMAGES, QUESTIONS, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)))
    assert torch.equal(want, got)
    assert sum("fast chat chunk failed" in r.message for r in caplog.records) == 2  # 11 tokens: chunks of 8 and 3


def test_fast_and_engine_path_sample_from_one_distribution(pair):
    """400 seeds (25 calls of 16 rows): the second token, the first one sampled in a chunk on the
    fast path, follows the top-p distribution of its logits on both paths. At T = 0.025 and
    top_p = 0.8 the first token is the argmax, so that distribution is known exactly."""
    question = [QUESTIONS[0]] * 16
    greedy_logits = []
    greedy = torch.stack(list(pair[0].chat_stream(IMAGES[:1] * 16, question, max_new_tokens=2,
                                                  on_logits=greedy_logits.append)))
    want = _truncated(greedy_logits[1][0], 0.025, 0.8).float()
    assert 2 <= int((want > 0).sum()) <= 6  # a few tokens: 400 draws tell their frequencies apart
    for rt in pair:
        drawn = torch.cat([torch.stack(list(rt.chat_stream(IMAGES[:1] * 16, question, max_new_tokens=2,
                                                           temperature=0.025, top_p=0.8, seed=16 * c)))
                           for c in range(25)], dim=1)
        assert (drawn[0] == greedy[0, 0]).all()
        freq = torch.bincount(drawn[1], minlength=want.shape[0]).float() / drawn.shape[1]
        assert 0.5 * (freq - want).abs().sum().item() < 0.08  # ~0.03 expected from 400 draws


def test_chat_rows_joining_mid_answer(pair):
    """A question that arrives while another decodes shares its chunks (other `end`, other lengths)."""
    results = []
    for rt in pair:
        first = rt.submit_chat(IMAGES[0], QUESTIONS[0], max_new_tokens=30)
        it = iter(first)
        head = [next(it) for _ in range(5)]
        second = rt.submit_chat(IMAGES[1], "Which shape is in the picture?", max_new_tokens=21)
        results.append((head + list(it), list(second)))
    assert results[0] == results[1]


def test_n_answers_and_logprobs_on_both_paths(pair):
    """n answers with logprobs (kept in chunks of 8 on the fast path, beside a request that keeps none)
    are the engine path's, and answer i is the answer of seed + i alone."""
    results = []
    for rt in pair:
        asking = rt.submit_chat(IMAGES[0], QUESTIONS[0], max_new_tokens=20, n=2, top_logprobs=3)
        plain = rt.submit_chat(IMAGES[1], QUESTIONS[1], max_new_tokens=20)
        answers = [list(asking.choice(i)) for i in range(2)]
        logprobs = [[asking.choice(i).logprobs(j) for j in range(len(a))] for i, a in enumerate(answers)]
        assert list(plain) and plain._row.logprobs == []
        assert answers[0] == answers[1]  # greedy
        sampled = rt.submit_chat(IMAGES[0], QUESTIONS[0], max_new_tokens=12, n=2, temperature=0.9, seed=3)
        alone = [list(rt.submit_chat(IMAGES[0], QUESTIONS[0], max_new_tokens=12, temperature=0.9, seed=3 + i))
                 for i in range(2)]
        assert [list(sampled.choice(i)) for i in range(2)] == alone
        results.append((answers, logprobs))
    (want, want_lp), (got, got_lp) = results
    assert got == want
    for a, b in zip(sum(want_lp, []), sum(got_lp, [])):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) < 1e-4


def test_rows_decode_up_to_a_full_cache_width():
    """With a short K/V cache (max_len 200) two rows of different lengths decode until the cache's
    width is max_len: on the engine path the width grows bucket by bucket while both rows are
    active (their columns move each time), and both paths give the same tokens."""
    from jfexport.runtime.batching.kv_cache import KVCache

    results = []
    for fast in (False, True):
        rt = JanusFlowRuntime.from_bundle(load_preset("tiny"), fast=fast)
        chat = rt.scheduler.chat
        rt.max_len = chat.max_len = 200
        chat.cache = KVCache(chat.cache.layout, chat.cache.slots, 200, "cpu", chat.executor.column_bucket)
        shared = Rows(rt)
        widths: list[int] = []
        rt.add_batch_observer(lambda kind, rows: widths.append(chat.cache.width))
        first = rt.submit_chat(IMAGES[0], QUESTIONS[0], max_new_tokens=82)  # 118 prompt tokens: 200 in all
        it = iter(first)
        head = [next(it) for _ in range(15)]
        second = rt.submit_chat(IMAGES[1], "Which shape is in the picture?", max_new_tokens=70)
        results.append((head + list(it), list(second)))
        assert shared.max("chat") == 2 and first.finish_reason == second.finish_reason == "length"
        assert max(widths) == 200
        if not fast:
            assert {128, 192, 200} <= set(widths)
        rt.close()
    assert results[0] == results[1] and len(results[1][1]) == 70


# -- text-to-image: the static-buffer Euler step ---------------------------------------------------

def test_fast_latents_equal_the_engine_path(pair):
    plain, fast = pair
    assert isinstance(fast.scheduler.generation.executor, TorchGenerationExecutor)
    want = plain.generate_latents(PROMPTS, n=2, steps=3, seed=5)
    got = fast.generate_latents(PROMPTS, n=2, steps=3, seed=5)
    assert (want - got).abs().max().item() < 1e-5
    # Rows of other prompts, step counts and CFG weights joining and leaving between steps.
    handles = [[rt.submit_generate(p, steps=s, cfg=c, seed=i) for i, (p, s, c) in
                enumerate([(PROMPTS[0], 6, 2.0), (PROMPTS[1] + " on a plain background", 3, 3.5), (PROMPTS[1], 4, 1.0)])]
               for rt in pair]
    for a, b in zip(*handles):
        a.wait(30)
        b.wait(30)
        assert (a._job.latents - b._job.latents).abs().max().item() < 1e-5
    buffers = fast.scheduler.generation.executor._buffers
    count = len(buffers)
    for prompt in PROMPTS:  # one shape, other prompts: the buffers are reused, the prompt K/V reloaded
        want = plain.generate_latents([prompt], steps=2, seed=7)
        assert (want - fast.generate_latents([prompt], steps=2, seed=7)).abs().max().item() < 1e-5
    assert len(buffers) == count  # (1 row, 16-token bucket) was made by the last image above


def test_fast_generation_previews_equal_the_engine_path(pair):
    """The torch executor's step hands out its guided velocity from its own buffers: the previews
    computed from it are the engine path's, and the images are those of a request without previews."""
    got = []
    for rt in pair:
        handle = rt.submit_generate(PROMPTS[0], n=2, steps=5, seed=9, previews=2)
        previews = [(p.image, p.index, np.asarray(p.picture, dtype=np.int16)) for p in handle.previews(timeout=60)]
        got.append((previews, [np.asarray(im, dtype=np.int16) for im in handle.result(timeout=60)]))
    (plain_previews, plain_images), (fast_previews, fast_images) = got
    assert [(i, j) for i, j, _ in plain_previews] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [(i, j) for i, j, _ in fast_previews] == [(i, j) for i, j, _ in plain_previews]
    for (_, _, a), (_, _, b) in zip(plain_previews, fast_previews):
        assert np.abs(a - b).max() <= 1  # fp32 on both paths: at most a rounding level of uint8
    alone = pair[1].generate([PROMPTS[0]], n=2, steps=5, seed=9)
    assert all(np.array_equal(a, np.asarray(b, dtype=np.int16)) for a, b in zip(fast_images, alone))


def test_a_compiler_that_fails_costs_speed_not_requests(pair, caplog):
    """torch.compile with a backend that cannot build the step (as without Triton): the executor
    logs it once and goes on eagerly, with the engine path's latents."""
    from jfexport.runtime.batching.generation_step import cfg_euler_step

    from jfexport.core.errors import InputError

    def no_compiler(graph, inputs):
        raise RuntimeError("this backend builds nothing")

    plain, _ = pair
    for option, message in (("compile_step", "compile_step"), ("cuda_graphs", "cuda_graphs"), ("chunk", "chunk")):
        with pytest.raises(InputError, match=f"{message} .*fast=True"):  # no fast executor to set up
            JanusFlowRuntime.from_bundle(load_preset("tiny"), **{option: 4 if option == "chunk" else True})
    rt = JanusFlowRuntime.from_bundle(load_preset("tiny"), fast=True, compile_step=True)
    executor = rt.scheduler.generation.executor
    assert isinstance(executor, TorchGenerationExecutor) and executor.compile_step
    executor._step = torch.compile(cfg_euler_step, backend=no_compiler, dynamic=False)
    try:
        with caplog.at_level("WARNING", logger="jfexport.runtime.batching.torch_generation"):
            got = rt.generate_latents(PROMPTS, steps=3, seed=5)
        assert (plain.generate_latents(PROMPTS, steps=3, seed=5) - got).abs().max().item() < 1e-5
        assert executor._step is cfg_euler_step
        assert sum("compiled Euler step failed" in r.message for r in caplog.records) == 1
    finally:
        rt.close()


def test_fast_is_opt_in_on_cpu():
    rt = JanusFlowRuntime.from_bundle(load_preset("tiny"))
    assert type(rt.scheduler.chat).__name__ == "ChatSlots" and type(rt.scheduler.generation).__name__ == "GenerationRows"
    rt.close()


# -- CUDA: graphs ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_chunks_and_steps_match_cpu():
    cpu = JanusFlowRuntime.from_bundle(load_preset("tiny"), fast=True)
    gpu = JanusFlowRuntime.from_bundle(load_preset("tiny"), device="cuda")
    assert gpu.scheduler.chat.executor.cuda_graphs and gpu.scheduler.generation.executor.cuda_graphs
    for seed in (2, 3):  # the second request replays the graphs captured by the first
        want = cpu.generate_latents(PROMPTS, n=2, steps=3, seed=seed)
        got = gpu.generate_latents(PROMPTS, n=2, steps=3, seed=seed)
        assert (want - got.cpu()).abs().max().item() < 1e-4
        a = torch.stack(list(cpu.chat_stream(IMAGES, QUESTIONS, max_new_tokens=67)))
        b = torch.stack(list(gpu.chat_stream(IMAGES, QUESTIONS, max_new_tokens=67)))
        assert torch.equal(a, b)
    chat = gpu.scheduler.chat.executor
    chunks = [state for state, _ in chat._chunks._items.values()]
    for states in (chunks, list(chat.prefills._states._items.values()),
                   list(gpu.scheduler.generation.executor._buffers._items.values())):
        # Captured, not fallen back to eager.
        assert len(states) and all(s.graph is not None for s in states)
    sampled = [torch.stack(list(rt.chat_stream(IMAGES, QUESTIONS, max_new_tokens=20, temperature=0.9, seed=4)))
               for rt in (gpu, gpu, cpu)]
    assert torch.equal(sampled[0], sampled[1]) and torch.equal(sampled[0], sampled[2])  # the draws are the rows' own
    cpu.close()
    gpu.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_euler_step_under_cuda_graphs_matches_cpu():
    cpu = JanusFlowRuntime.from_bundle(load_preset("tiny"), fast=True)
    gpu = JanusFlowRuntime.from_bundle(load_preset("tiny"), device="cuda", compile_step=True)
    for seed in (2, 3):  # the second request replays the graph of the compiled step
        want = cpu.generate_latents(PROMPTS, n=2, steps=3, seed=seed)
        got = gpu.generate_latents(PROMPTS, n=2, steps=3, seed=seed)
        assert (want - got.cpu()).abs().max().item() < 1e-4
    buffers = gpu.scheduler.generation.executor._buffers
    assert len(buffers) and all(s.graph is not None for s in buffers._items.values())
    cpu.close()
    gpu.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_step", [False, True])
def test_previews_under_cuda_graphs_match_cpu(compile_step):
    """A replayed step refills the velocity the capture handed out: the previews of a request that
    replays the graph are its own, not those of the step captured first."""
    cpu = JanusFlowRuntime.from_bundle(load_preset("tiny"), fast=True)
    gpu = JanusFlowRuntime.from_bundle(load_preset("tiny"), device="cuda", compile_step=compile_step)
    for seed in (2, 3):
        got = []
        for rt in (cpu, gpu):
            handle = rt.submit_generate(PROMPTS[0], n=2, steps=5, seed=seed, previews=3)
            got.append([np.asarray(p.picture, dtype=np.int16) for p in handle.previews(timeout=120)])
            handle.result(timeout=120)
        assert len(got[0]) == len(got[1]) == 6
        assert all(np.abs(a - b).max() <= 1 for a, b in zip(*got)), seed
    buffers = gpu.scheduler.generation.executor._buffers
    assert len(buffers) and all(s.graph is not None for s in buffers._items.values())
    cpu.close()
    gpu.close()


# -- the benchmark: every change on and off, at batch 1 and 4, on CPU at the tiny preset --------------

def test_bench_measures_each_change_on_and_off():
    from torch._dynamo.utils import counters

    from jfexport.tools.bench_paths import bench_torch_paths

    bundle = load_preset("tiny")
    compiled_before = counters["stats"]["unique_graphs"]
    result = bench_torch_paths(bundle, "cpu", torch.float32, [1, 4], steps=2, cfg=2.0, warmup=0, runs=1,
                               max_new_tokens=10, prompt=PROMPTS[0], chunk=4, compile_step=True)
    assert counters["stats"]["unique_graphs"] >= compiled_before + 2  # the compiled variant compiled (two shapes)
    serving = result["serving_through_the_scheduler"]
    for batch in ("batch_1", "batch_4"):
        rows = serving[batch]
        # No CUDA here: the graph variants are absent, never reported with eager numbers.
        assert set(rows) == {"engine_path", "fast_eager_chunk1", "fast_eager_chunk4", "fast_fp8_chunk4",
                             "fast_compiled_eager"}
        assert rows["fast_eager_chunk4"]["generation"]["max_abs_vs_engine_path"] < 1e-5
        assert rows["fast_compiled_eager"]["generation"]["max_abs_vs_engine_path"] < 1e-5
        assert 1e-5 < rows["fast_fp8_chunk4"]["generation"]["max_abs_vs_engine_path"] < 0.5  # FP8 does change them
        assert "generation" not in rows["fast_eager_chunk1"]  # the chunk changes only decoding
        assert "understanding" not in rows["fast_compiled_eager"]  # compiling the Euler step changes only generation
        assert all(r["understanding"]["tokens_per_answer"] == 10 for r in rows.values() if "understanding" in r)
        generation = result["generation"][batch]
        assert generation["c_cuda_graph_step"] is None and generation["c2_cuda_graph_whole_loop"] is None
        stages = generation["step_breakdown"]
        assert [k for k in stages if k != "sum_ms"] == ["gen_encoder", "llm_decode", "gen_decoder", "cfg_euler"]
        assert all(stages[k]["floor_ms"] > 0 for k in ("gen_encoder", "llm_decode", "gen_decoder"))
        assert stages["cfg_euler"]["floor_ms"] is None and stages["sum_ms"] > 0
    quality = result["fp8_quality"]
    assert quality["kernel"] == "dequantised emulation" and quality["greedy_tokens"] == 10
    assert 0 < quality["latent_max_abs_error"] < 0.5 and quality["image_psnr_db"] > 20
    assert bundle.model.language_model.model.layers[0].mlp.down_proj.__class__ is torch.nn.Linear  # FP8 undone


def test_step_stages_in_order_are_the_euler_step():
    """The benchmark times the stages of `cfg_euler_step` one by one: together they must be that step."""
    from jfexport.runtime.batching.generation_step import cfg_euler_step

    from jfexport.core.images import initial_noise
    from jfexport.tools.torch_paths import FastSampler, step_stages

    bundle = load_preset("tiny")
    model = bundle.model
    tokens = bundle.processor.generation_tokens(PROMPTS)
    size = bundle.latent_size
    z0 = initial_noise((2, 4, size, size), 3, torch.float32)
    sampler = FastSampler(model, bundle.config.image_grid(size))
    with torch.inference_mode():
        b, timesteps = sampler.prepare(tokens.input_ids, tokens.attention_mask, z0, 4, 3.0,
                                       bundle.processor.tokenizer.pad_id)
        b.timesteps.fill_(float(timesteps[1]))
        want = cfg_euler_step(sampler.executor, b)
        for _, fn in step_stages(sampler.executor, b):
            fn()
    assert not torch.equal(want, z0) and torch.equal(b.z, want)


# -- FP8 ---------------------------------------------------------------------------------------------

def test_fp8_linear_rounds_like_e4m3_and_is_undone():
    from jfexport.tools.fp8 import FP8Linear, fp8_matmuls

    linear = torch.nn.Linear(64, 96, bias=False)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    want, got = linear(x), FP8Linear(linear)(x)
    error = ((got - want).norm() / want.norm()).item()
    assert got.shape == want.shape and 1e-3 < error < 0.06  # e4m3 keeps 3 mantissa bits: a few % per product
    moved = FP8Linear(linear).to(torch.float64)  # what from_bundle's model.to(dtype) does to it
    assert moved.weight_fp8.dtype == torch.float8_e4m3fn and moved.weight_scale.dtype == torch.float32
    assert torch.equal(moved(x.double()).float(), got)
    model = load_preset("tiny").model
    with pytest.raises(RuntimeError, match="inside"):
        with fp8_matmuls(model) as replaced:
            assert replaced == 7 * len(model.language_model.model.layers)
            assert isinstance(model.language_model.model.layers[0].self_attn.q_proj, FP8Linear)
            raise RuntimeError("inside")
    assert all(type(m) is not FP8Linear for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
def test_scaled_mm_equals_the_emulation():
    from jfexport.tools.fp8 import FP8Linear

    linear = torch.nn.Linear(256, 512, bias=False).to("cuda", torch.bfloat16)
    x = torch.randn(7, 256, device="cuda", dtype=torch.bfloat16)
    fast = FP8Linear(linear)(x).float()
    emulated = FP8Linear(linear.cpu().float())(x.cpu().float())
    assert ((fast.cpu() - emulated).norm() / emulated.norm()).item() < 1e-2  # bf16 output rounding only
