"""The K/V cache written in place (issue 20): the new-K/V decode contract on ONNX Runtime, slots
handed out and reused, prefix reuse for conversations, and the refusal of format-1 builds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from jfexport.reference.bundle import load_preset
from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
from jfexport.runtime.batching.kv_cache import KVCache, KVLayout
from jfexport.runtime.batching.prefix_cache import PrefixCache
from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

from jfexport.core.graph_contract import NEW, kv_name
from jfexport.core.manifest import FORMAT, EnginesError

COLOURS = [(210, 30, 30), (30, 200, 30), (30, 30, 220), (200, 200, 30), (20, 20, 20), (240, 240, 240),
           (120, 40, 160), (30, 160, 160)]
IMAGES = [Image.new("RGB", (40 + 6 * i, 64 - 3 * i), c) for i, c in enumerate(COLOURS)]
QUESTIONS = ["What colour is the shape?", "Where?", "Describe the picture in detail, please.", "Is it round?",
             "What is shown here?", "Colour?", "Which shape is in the picture, and where is it?", "Why?"]
TOKENS = 70  # every comparison below runs past 64 tokens


@pytest.fixture(scope="module")
def built(tiny_build):
    return tiny_build


@pytest.fixture(scope="module")
def reference():
    return ReferencePipeline(load_preset("tiny"))


@pytest.fixture(scope="module")
def runtime(built):
    rt = JanusFlowRuntime.from_engines(built)
    yield rt
    rt.close()


def _reference_tokens(reference, images, questions) -> list[list[int]]:
    return torch.stack(list(reference.chat_stream(images, questions, max_new_tokens=TOKENS))).T.tolist()


def test_the_decode_graph_returns_only_the_new_k_v(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["format"] == FORMAT == "jfexport-manifest/3"
    spec = manifest["graphs"]["llm_decode"]["spec"]
    outputs = {t["name"]: t["shape"] for t in spec["outputs"]}
    assert outputs[kv_name(NEW, 0, "key")] == ["B", 4, "T", 16]
    assert not any(name.startswith("present.") for name in outputs)


def test_tokens_equal_the_reference_at_one_and_eight_rows_across_slot_reuse(runtime, reference):
    cache = runtime.scheduler.chat.cache
    assert cache is not None and cache.slots == 16  # sized at load, from the manifest
    eight = torch.stack(list(runtime.chat_stream(IMAGES, QUESTIONS, max_new_tokens=TOKENS))).T.tolist()
    assert eight == _reference_tokens(reference, IMAGES, QUESTIONS)
    # One row, then rows that join while others decode and leave at other times: slots are handed
    # out again (a freed slot is filled by the last one), at other columns.
    one = torch.stack(list(runtime.chat_stream(IMAGES[2:3], QUESTIONS[2:3], max_new_tokens=TOKENS)))[:, 0].tolist()
    assert one == eight[2]
    handles = []
    for i in range(8):
        handles.append(runtime.submit_chat(IMAGES[i], QUESTIONS[i], max_new_tokens=TOKENS - 4 * (i % 3)))
        if i % 3 == 2:
            next(iter(handles[0]))  # let earlier rows decode a little before the next ones join
    for i, h in enumerate(handles):
        h.text(timeout=120)
        want = eight[i][: TOKENS - 4 * (i % 3)]
        eos = runtime.tokenizer.eos_id
        assert h.token_ids == want[: (want.index(eos) + 1) if eos in want else len(want)]
    assert cache.rows == 0 or all(n > 0 for n in cache.lengths)


def test_generation_latents_are_unchanged(runtime, reference):
    prompts = ["a red circle at the top left", "a star"]
    got = runtime.generate_latents(prompts, n=2, steps=4, seed=3)
    want = reference.generate_latents(prompts, n=2, steps=4, seed=3)
    assert (got - want).abs().max().item() < 1e-5


def _three_turns(rt: JanusFlowRuntime) -> list[list[int]]:
    """Three turns of one conversation, each following the answers before it; the token ids of each answer."""
    history: list[tuple[str, str]] = []
    answers = []
    for question in ("What colour is the shape?", "And where is it?", "Describe it once more, please."):
        handle = rt.submit_chat(IMAGES[0], question, max_new_tokens=20, history=history or None)
        text = handle.text(timeout=60)
        answers.append(handle.token_ids)
        history += [("user", question), ("assistant", text)]
    return answers


def test_prefix_reuse_gives_the_same_tokens_and_runs_only_the_new_ones(built):
    plain = JanusFlowRuntime.from_engines(built, prefix_cache_bytes=0)
    reused = JanusFlowRuntime.from_engines(built)
    try:
        want = _three_turns(plain)
        seen: list[tuple[str, int]] = []
        reused.add_batch_observer(lambda kind, rows: seen.append((kind, rows)))
        assert _three_turns(reused) == want
        prefixes = reused.scheduler.chat.prefixes
        assert plain.scheduler.chat.prefixes.reused_tokens == 0
        # Turns 2 and 3 start from the stored K/V of the turn before: most of their prompt is not run.
        assert seen.count(("prefill", 1)) == 1 and prefixes.hits == 2
        assert prefixes.reused_tokens > 2 * 118
    finally:
        plain.close()
        reused.close()


def _kv(tokens: int, value: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((2, tokens, 4), value), torch.full((2, tokens, 4), value)) for _ in range(3)]


def test_the_prefix_cache_evicts_the_least_recently_used_within_its_budget():
    entry = 3 * 2 * (2 * 10 * 4 * 4)  # 3 layers x (key, value) x [2, 10, 4] fp32
    cache = PrefixCache(budget_bytes=2 * entry + 1)
    cache.store("img-a", list(range(10)), _kv(10, 1.0))
    cache.store("img-b", list(range(10)), _kv(10, 2.0))
    assert cache.longest("img-a", list(range(5)) + [99, 98], at_least=0)[1] == 5  # a's entry is now the newest
    cache.store("img-c", list(range(10)), _kv(10, 3.0))  # over the budget: b, least recently used, goes
    assert len(cache) == 2 and cache.nbytes <= cache.budget_bytes
    assert cache.longest("img-b", list(range(12)), at_least=0) is None
    hit, count = cache.longest("img-a", list(range(12)), at_least=0)
    assert count == 10 and hit.kv[0][0][0, 0, 0] == 1.0
    assert cache.longest("img-a", list(range(12)), at_least=11) is None  # the image lies past the prefix
    assert cache.longest("img-c", [0, 1, 2], at_least=0)[1] == 2  # the last token always runs
    cache.store("img-a", list(range(20)), _kv(20, 4.0))  # too big for the budget with the others
    assert cache.nbytes <= cache.budget_bytes and len(cache) == 1
    too_small = PrefixCache(budget_bytes=entry - 1)
    too_small.store("img", list(range(10)), _kv(10, 1.0))
    assert len(too_small) == 0 and too_small.nbytes == 0  # an entry over the whole budget is not kept


def test_a_tiny_prefix_budget_reuses_nothing_and_changes_nothing(built):
    plain = JanusFlowRuntime.from_engines(built, prefix_cache_bytes=0)
    small = JanusFlowRuntime.from_engines(built, prefix_cache_bytes=4096)
    try:
        assert _three_turns(small) == _three_turns(plain)
        prefixes = small.scheduler.chat.prefixes
        assert len(prefixes) == 0 and prefixes.hits == 0
    finally:
        plain.close()
        small.close()


def test_cache_slots_stay_dense_and_columns_move_with_the_width():
    layout = KVLayout(layers=2, kv_heads=2, head_dim=3, dtype=torch.float32)
    cache = KVCache(layout, slots=3, max_len=40, device="cpu", bucket=8)
    assert cache.width == 8
    out = {kv_name("present", i, part): torch.arange(2 * 2 * 5 * 3, dtype=torch.float32).view(2, 2, 5, 3) + 100 * i
           for i in range(2) for part in ("key", "value")}
    for row in range(3):
        slot = cache.acquire()
        cache.put(slot, 0, out, row % 2, 5 - (2 + row), 2 + row)  # rows of 2, 3, 4 tokens
    assert cache.lengths == [2, 3, 4] and cache.free == 0
    with pytest.raises(RuntimeError, match="no free slot"):
        cache.acquire()
    before = [k[2, :, :4].clone() for k, _ in cache.layers()]
    cache.fit(20)  # 24 columns: the live columns move
    assert cache.width == 24
    assert all(torch.equal(k[2, :, :4], b) for (k, _), b in zip(cache.layers(), before))
    past = cache.past(3)
    assert past["past.0.key"].shape == (3, 2, 24, 3) and past["past.0.key"].is_contiguous()
    assert past["past.0.key"].data_ptr() == cache.buffers[0][0].data_ptr()  # a view: nothing gathered
    cache.release(0)  # the last slot (4 tokens) moves into slot 0
    assert cache.lengths == [4, 3]
    assert all(torch.equal(k[0, :, :4], b) for (k, _), b in zip(cache.layers(), before))
    mask = cache.mask(cache.lengths, 1)
    assert mask.shape == (2, 25) and mask.sum(dim=1).tolist() == [5, 4] and mask[:, -1].all()


def test_a_format_1_build_is_refused_with_a_rebuild_message(built, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(built, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format"] = "jfexport-manifest/1"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EnginesError, match=r"jfexport-manifest/1.*returns past \+ new K/V.*rebuild the engines "
                                           r"\(`jfexport build --out "):
        JanusFlowRuntime.from_engines(old)


def test_the_decode_benchmark_reports_every_figure(built):
    from jfexport.tools.bench_decode import bench_decode

    manifest = json.loads((built / "manifest.json").read_text())
    results = bench_decode(lambda **kw: JanusFlowRuntime.from_engines(built, tasks=("chat",), **kw),
                           manifest["graphs"]["llm_decode"]["spec"]["extra"]["hidden"], weights=10**6, tokens=6,
                           long_context=400, rounds=1)
    rows = {(d["rows"], d["context"]) for d in results["decode"]}
    assert rows == {(r, kind) for r in (1, 4, 8) for kind in ("short", "long")}
    assert min(d["context_tokens"] for d in results["decode"] if d["context"] == "long") > 300
    for d in results["decode"]:
        assert d["tokens_per_s_best"] > 0 and d["bytes_per_step"]["ratio_to_floor"] >= 1.0
        assert d["bytes_per_step"]["kv_format1_estimate"] > d["bytes_per_step"]["kv_as_fed"]
    turns = results["ttft_ms_per_turn"]
    assert len(turns["with_prefix_reuse"]["min"]) == len(turns["without"]["min"]) == 3
    assert {"8_rows_over_1_short_min", "turn2_ttft_over_turn1_with_reuse_min"} <= set(results["ratios"])
    longest = manifest["limits"]["max_seq"] - 1  # the tiny build's: 1023
    assert [(c["rows"], c["past"]) for c in results["llm_decode_call_ms"]] == [(1, 16), (1, longest), (8, longest)]
