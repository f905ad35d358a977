"""The serving scheduler's guarantees, on real engines: the bundled default model built for ONNX
Runtime, and the same model on the torch backend."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch
from jfexport.reference.bundle import load_bundle
from jfexport.runtime.errors import NonFiniteOutput, Overloaded, RequestCancelled, RequestTimeout, SchedulerStopped
from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

from jfexport.core.errors import InputError

PROMPT = "a red circle at the top left"
LONG_PROMPT = "a big green triangle at the bottom right of the picture, drawn on a plain background"
IMAGE = Image.new("RGB", (64, 64), (210, 30, 30))
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def build_dir(default_build):
    return default_build


def _open(kind: str, build_dir, **kwargs) -> JanusFlowRuntime:
    if kind == "onnxruntime":
        return JanusFlowRuntime.from_engines(build_dir, **kwargs)
    return JanusFlowRuntime.from_bundle(load_bundle(), **kwargs)


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def runtime(request, build_dir):
    rt = _open(request.param, build_dir)
    yield rt
    rt.close()


class Rows:
    """Batch observer: the rows of every engine step, by kind."""

    def __init__(self, runtime: JanusFlowRuntime):
        self.seen: dict[str, list[int]] = {}
        runtime.add_batch_observer(lambda kind, rows: self.seen.setdefault(kind, []).append(rows))

    def max(self, kind: str) -> int:
        return max(self.seen.get(kind, [0]))


def _wait(predicate, limit: float = 10.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)
    return time.monotonic() - start


def _tokens(runtime, question: str, **kwargs) -> torch.Tensor:
    return torch.stack(list(runtime.chat_stream([IMAGE], [question], **kwargs)))


def test_a_result_does_not_depend_on_its_companions(runtime):
    z_alone = runtime.generate_latents([PROMPT], steps=6, cfg=2.0, seed=11)
    tokens_alone = _tokens(runtime, QUESTION, max_new_tokens=8)
    sampled_alone = _tokens(runtime, QUESTION, max_new_tokens=8, temperature=0.9, seed=5)
    rows = Rows(runtime)
    # Companions of other lengths, steps, CFG weights and sampling settings, all in flight at once.
    others = [runtime.submit_generate(LONG_PROMPT, n=2, steps=9, cfg=3.5, seed=3),
              runtime.submit_generate("a blue star", steps=4, seed=1),
              runtime.submit_chat(IMAGE, "Where is the shape in the picture?", max_new_tokens=12),
              runtime.submit_chat(Image.new("RGB", (30, 60), (0, 0, 200)), "Which shape?", max_new_tokens=6,
                                  temperature=1.0, seed=2)]
    results: dict[str, object] = {}
    jobs = {"z": lambda: runtime.generate_latents([PROMPT], steps=6, cfg=2.0, seed=11),
            "greedy": lambda: _tokens(runtime, QUESTION, max_new_tokens=8),
            "sampled": lambda: _tokens(runtime, QUESTION, max_new_tokens=8, temperature=0.9, seed=5)}
    threads = [threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f())) for k, f in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for h in others[:2]:
        h.result(timeout=60)
    for h in others[2:]:
        h.text(timeout=60)
    assert (results["z"] - z_alone).abs().max().item() <= 1e-5
    assert torch.equal(results["greedy"], tokens_alone) and torch.equal(results["sampled"], sampled_alone)
    assert rows.max("generation") >= 2 and rows.max("chat") >= 2  # they really shared engine calls


def test_images_join_and_leave_between_steps(runtime):
    rows = Rows(runtime)
    slow = runtime.submit_generate(PROMPT, steps=40, seed=1)
    _wait(lambda: slow.progress[0] >= 3)
    fast = runtime.submit_generate("a blue star", steps=3, seed=2)
    fast.result(timeout=30)
    assert not slow.done() and slow.progress[0] < 40  # the late one finished first, beside the slow one
    slow.result(timeout=60)
    assert 2 in rows.seen["generation"] and rows.seen["generation"][-1] == 1


def test_a_question_gets_its_first_token_while_images_are_generated(runtime):
    images = runtime.submit_generate(LONG_PROMPT, n=4, steps=60, seed=4)
    _wait(lambda: images.progress[0] >= 2)
    asked_at = images.progress[0]
    answer = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=4)
    next(iter(answer), None)
    # Prefill and the first token come within a few iterations, not after the 60 steps.
    assert images.progress[0] - asked_at <= 3
    images.cancel()


def test_a_paused_or_dropped_stream_blocks_nobody_and_frees_its_slot(runtime):
    paused = runtime.chat_stream([IMAGE], ["Describe the picture."], max_new_tokens=60, temperature=1.0, seed=3)
    next(paused)
    assert runtime.generate_latents([PROMPT], steps=2).shape[0] == 1  # served while the reader sleeps
    assert runtime.chat([IMAGE], [QUESTION], max_new_tokens=3)
    paused.close()
    _wait(lambda: runtime.stats()["active_chat_rows"] == 0, 2.0)
    handle = runtime.submit_chat(IMAGE, "Describe the picture.", max_new_tokens=60, temperature=1.0, seed=3)
    # The handle as an argument, not a closure over the name that `del` clears.
    _wait(lambda h=handle: runtime.stats()["active_chat_rows"] == 1 or h.done(), 5.0)
    del handle  # dropped unread: the request is cancelled
    _wait(lambda: runtime.stats()["active_chat_rows"] == 0, 2.0)


def test_cancellation_and_timeouts(runtime):
    handle = runtime.submit_generate(PROMPT, n=2, steps=500, seed=1)
    _wait(lambda: handle.progress[0] >= 1)
    handle.cancel()
    with pytest.raises(RequestCancelled):
        handle.result(timeout=5)
    _wait(lambda: runtime.stats()["active_generation_rows"] == 0, 2.0)
    start = time.monotonic()
    with pytest.raises(RequestTimeout):
        runtime.generate([PROMPT], n=4, steps=1000, timeout=0.3)
    assert time.monotonic() - start < 3
    with pytest.raises(RequestTimeout):
        runtime.chat([IMAGE], [QUESTION], max_new_tokens=5, timeout=1e-6)
    _wait(lambda: runtime.stats()["active_generation_rows"] == 0 and runtime.stats()["queue_depth"] == 0, 2.0)


def test_a_callback_may_call_the_runtime(runtime):
    inner: list[torch.Tensor] = []

    def on_step(done: int, total: int) -> None:
        if done == 1:
            inner.append(runtime.generate_latents(["a blue star"], steps=2))

    worker = threading.Thread(target=lambda: runtime.generate_latents([PROMPT], steps=3, on_step=on_step))
    worker.start()
    worker.join(30)
    assert not worker.is_alive() and len(inner) == 1


def test_rows_per_engine_call_stay_within_the_build(build_dir):
    runtime = _open("onnxruntime", build_dir)
    widest: dict[str, int] = {}
    for name, engine in list(runtime.engines.items()):
        runtime.engines[name] = _Recording(engine, widest)
    handles = [runtime.submit_generate(PROMPT, n=3, steps=3, seed=i) for i in range(6)]  # 18 images
    handles.append(runtime.submit_generate(PROMPT, n=9, steps=3))  # 18 rows under CFG: one request, two calls
    chats = [runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=3) for _ in range(20)]
    for h in handles:
        h.result(timeout=60)
    for c in chats:
        c.text(timeout=60)
    runtime.close()
    assert widest["llm_decode"] == runtime.max_rows == 16 and widest["gen_encoder"] <= 8
    assert max(widest.values()) <= 16
    assert len(handles[-1].result()) == 9


class _Recording:
    def __init__(self, engine, widest: dict[str, int]):
        self.engine, self.widest, self.name = engine, widest, engine.name

    def run(self, feeds, outputs=None, names=None):
        rows = next(iter(feeds.values())).shape[0]
        self.widest[self.name] = max(self.widest.get(self.name, 0), rows)
        return self.engine.run(feeds, outputs, names)


def test_a_full_queue_is_refused_at_once(build_dir):
    runtime = _open("onnxruntime", build_dir, max_queue=2)
    wide = runtime.max_rows // 2
    first = runtime.submit_generate(PROMPT, n=wide, steps=200)
    _wait(lambda: first.progress[0] >= 1)
    waiting = [runtime.submit_generate(PROMPT, n=wide, steps=2) for _ in range(2)]
    start = time.monotonic()
    with pytest.raises(Overloaded) as refused:
        runtime.submit_generate(PROMPT, steps=2)
    assert time.monotonic() - start < 0.5 and refused.value.retry_after >= 1
    assert runtime.stats()["queue_depth"] == 2
    first.cancel()
    for h in waiting:
        h.result(timeout=30)
    runtime.close()


class _Poisoned:
    """Wraps a real engine and fails rows marked by a value only the victim request carries."""

    def __init__(self, engine, marked, action: str):
        self.engine, self.marked, self.action, self.name = engine, marked, action, engine.name

    def run(self, feeds, outputs=None, names=None):
        rows = self.marked(feeds)
        if rows.any() and self.action == "raise":
            raise RuntimeError(f"{self.name}: injected engine failure")
        if rows.any() and self.action == "die":
            raise KeyboardInterrupt  # not an Exception: nothing may catch it but the scheduler's last guard
        out = self.engine.run(feeds, outputs, names)
        if rows.any() and self.action == "nan":
            out = dict(out)
            first = next(iter(out))
            out[first] = out[first].clone()
            out[first][rows] = float("nan")
        return out


def _steps7(feeds) -> torch.Tensor:
    # t = 1000/7 is the second timestep of a 7-step request only.
    return (feeds["timesteps"] - 1000 / 7).abs() < 1e-3


def test_a_failing_request_fails_alone(build_dir):
    runtime = _open("onnxruntime", build_dir)
    engines = runtime.engines
    engines["gen_encoder"] = _Poisoned(engines["gen_encoder"], _steps7, "nan")
    victim_word = runtime.tokenizer.encode(" zebra")[-1]
    engines["embed_tokens"] = _Poisoned(engines["embed_tokens"], lambda f: (f["input_ids"] == victim_word).any(dim=1),
                                        "raise")
    healthy = [runtime.submit_generate(PROMPT, steps=5, seed=i) for i in range(3)]
    victim = runtime.submit_generate(PROMPT, steps=7, seed=9)
    chats = [runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=4) for _ in range(2)]
    chat_victim = runtime.submit_chat(IMAGE, "Is this a zebra?", max_new_tokens=4)
    with pytest.raises(NonFiniteOutput, match="step 1"):
        victim.result(timeout=30)
    with pytest.raises(RuntimeError, match="injected"):
        chat_victim.text(timeout=30)
    assert all(len(h.result(timeout=30)) == 1 for h in healthy)
    assert all(c.finish_reason in ("stop", "length") for c in chats if c.text(timeout=30) is not None)
    assert runtime.generate_latents([PROMPT], steps=2).isfinite().all()  # the scheduler goes on
    runtime.close()


def test_if_the_scheduler_dies_every_waiter_hears_it(build_dir):
    runtime = _open("onnxruntime", build_dir)
    runtime.engines["gen_encoder"] = _Poisoned(runtime.engines["gen_encoder"], _steps7, "die")
    bystander = runtime.submit_chat(IMAGE, "Describe the picture.", max_new_tokens=200, temperature=1.0)
    killer = runtime.submit_generate(PROMPT, steps=7)
    start = time.monotonic()
    with pytest.raises(SchedulerStopped):
        killer.result(timeout=10)
    with pytest.raises(SchedulerStopped):
        bystander.text(timeout=10)
    assert time.monotonic() - start < 5
    with pytest.raises(SchedulerStopped):
        runtime.submit_generate(PROMPT, steps=1)


def test_empty_and_bad_requests(runtime):
    assert runtime.chat([IMAGE], [QUESTION], max_new_tokens=0) == [""]
    with pytest.raises(InputError, match="top_p"):
        runtime.submit_chat(IMAGE, QUESTION, top_p=0.0)
    with pytest.raises(InputError, match="steps"):
        runtime.submit_generate(PROMPT, steps=0)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_memory_stays_flat_over_1000_mixed_requests(build_dir):
    runtime = _open("onnxruntime", build_dir)
    done = [0]

    def client(i: int, count: int) -> None:
        for j in range(count):
            if (i + j) % 2:
                runtime.generate_latents([PROMPT if j % 3 else LONG_PROMPT], steps=2, seed=j)
            else:
                runtime.chat([IMAGE], [QUESTION if j % 3 else "Where is the shape in the picture?"], max_new_tokens=4)
            done[0] += 1

    def run(count: int) -> None:
        threads = [threading.Thread(target=client, args=(i, count)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)

    run(25)  # warm-up: 200 requests fill the allocator pools
    before = _rss_mib()
    run(100)  # 800 more
    growth = _rss_mib() - before
    runtime.close()
    assert done[0] == 1000
    assert growth < 40, f"RSS grew {growth:.1f} MiB over 800 requests"


def test_serving_from_an_engines_folder_imports_no_model_code(build_dir):
    code = f"""
import sys
from jfexport.runtime.pipelines import JanusFlowRuntime
rt = JanusFlowRuntime.from_engines({str(build_dir)!r})
rt.generate(["a red circle"], steps=2)
rt.chat_stream
from PIL import Image
rt.chat([Image.new("RGB", (64, 64))], ["What colour?"], max_new_tokens=2)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "diffusers")
             or m.startswith(("jfexport.reference", "jfexport.tools", "jfexport.export", "jfexport.commands")))
print("LOADED", bad)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout, res.stdout


def test_chat_needs_no_vae_and_generate_no_vision_encoder(build_dir, tmp_path):
    import shutil

    from .conftest import run_cli

    folder = tmp_path / "build"
    shutil.copytree(build_dir, folder)
    (folder / "vae_decoder.onnx").unlink()
    image = tmp_path / "red.png"
    IMAGE.save(image)
    res = run_cli("chat", "--engines", str(folder), "--image", str(image), QUESTION, "--max-new-tokens", "3")
    assert res.returncode == 0, res.stderr
    res = run_cli("generate", "--engines", str(folder), PROMPT, "--steps", "1", "-o", str(tmp_path / "out"))
    assert res.returncode != 0 and "vae_decoder" in res.stderr and "Traceback" not in res.stderr
    shutil.copy(build_dir / "vae_decoder.onnx", folder / "vae_decoder.onnx")
    (folder / "vision_encoder.onnx").unlink()
    res = run_cli("generate", "--engines", str(folder), PROMPT, "--steps", "1", "-o", str(tmp_path / "out"),
                  "--verify-files")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "image_0.png").is_file()


def test_rows_of_one_call_end_in_any_order(runtime):
    # Answers of different lengths: rows leave their slots out of order, each as it ends; the
    # same question about two images makes two rows equal but for their pixels.
    questions = ["What colour is the shape?", "Where is the shape in the picture?", "What colour is the shape?",
                 "Describe it."]
    images = [Image.new("RGB", (64, 64), c) for c in ((210, 30, 30), (30, 30, 210), (30, 200, 30), (230, 210, 30))]
    together = runtime.chat(images, questions, max_new_tokens=12)
    alone = [runtime.chat([im], [q], max_new_tokens=12)[0] for im, q in zip(images, questions)]
    assert together == alone
    lengths = [len(runtime.tokenizer.encode(a)) for a in alone]
    assert len(set(lengths)) > 1  # the rows really ended at different tokens


def test_a_lone_request_whose_step_raises_fails_and_the_scheduler_goes_on(build_dir):
    runtime = _open("onnxruntime", build_dir)
    engines = runtime.engines
    healthy = dict(engines)
    engines["gen_encoder"] = _Poisoned(engines["gen_encoder"], _steps7, "raise")
    # One-token decoding raises (the question's prompt is over 60 tokens): prefill passes, decoding fails.
    engines["llm_decode"] = _Poisoned(engines["llm_decode"],
                                      lambda f: (f["position_ids"][:, :1] > 60).any(dim=1) & (f["position_ids"].shape[1] == 1),
                                      "raise")
    with pytest.raises(RuntimeError, match="injected"):
        runtime.generate_latents([PROMPT], steps=7)
    long_answer = runtime.submit_chat(IMAGE, "Describe the picture.", max_new_tokens=200, temperature=1.0)
    with pytest.raises(RuntimeError, match="injected"):
        long_answer.text(timeout=30)
    assert runtime.scheduler.alive()
    engines.update(healthy)
    assert runtime.generate_latents([PROMPT], steps=2).isfinite().all()
    assert runtime.chat([IMAGE], [QUESTION], max_new_tokens=3)
    runtime.close()


def test_ended_rows_have_nan_logits_and_verify_compares_the_live_ones(runtime):
    from jfexport.tools.verify import _abs_max

    seen: list[torch.Tensor] = []
    images = [IMAGE, Image.new("RGB", (64, 64), (30, 30, 210))]
    tokens = torch.stack(list(runtime.chat_stream(images, [QUESTION, "Where is the shape in the picture?"],
                                                  max_new_tokens=12, on_logits=seen.append)))
    ended = (tokens == runtime.tokenizer.eos_id).cumsum(0).roll(1, 0).clamp(max=1).bool()
    ended[0] = False
    assert ended.any(), "one answer must end before the other for this test"
    for step, logits in enumerate(seen):
        assert torch.equal(torch.isnan(logits).all(1), ended[step])
    reference = [torch.nan_to_num(x, nan=1.0) for x in seen]
    assert max(_abs_max(a, b) for a, b in zip(seen, reference)) == 0.0


def _narrowed(runtime: JanusFlowRuntime, max_rows: int) -> JanusFlowRuntime:
    """The same engines behind a runtime that puts at most `max_rows` rows in one engine call."""
    return JanusFlowRuntime(runtime.engines, runtime.processor, runtime.latent_shape, runtime.grid, runtime.image_size,
                            runtime.max_len, max_rows, runtime.backend)


def test_a_request_larger_than_one_engine_call_equals_one_call(build_dir):
    """3 prompts x 2 images through 3 images per call (the second prompt's images in two calls, each
    beside another prompt's) compute the latents and images of the same request in one engine call."""
    wide = _open("onnxruntime", build_dir)
    narrow = _narrowed(wide, 6)
    prompts = [PROMPT, LONG_PROMPT, "a blue square"]
    widest: dict[str, int] = {}
    for name, engine in list(narrow.engines.items()):
        narrow.engines[name] = _Recording(engine, widest)  # the dict both runtimes share
    try:
        ragged = narrow.generate_latents(prompts, n=2, steps=3, seed=5)
        narrow_rows = dict(widest)
        whole = wide.generate_latents(prompts, n=2, steps=3, seed=5)
        images_narrow = narrow.generate(prompts, n=2, steps=3, seed=5)
        images_wide = wide.generate(prompts, n=2, steps=3, seed=5)
    finally:
        narrow.close()
        wide.close()
    assert narrow_rows["llm_decode"] == 6 and narrow_rows["gen_encoder"] == 3
    assert widest["llm_decode"] == 12  # the 6 images of the wide runtime in one call
    assert ragged.shape == whole.shape == (6, *wide.latent_shape)
    assert (ragged - whole).abs().max().item() < 1e-5
    assert [im.tobytes() for im in images_narrow] == [im.tobytes() for im in images_wide]


def test_a_request_cancelled_between_its_parts_frees_its_rows_and_leaves_the_queue(build_dir):
    runtime = _narrowed(_open("onnxruntime", build_dir), 2)  # one image per call
    big = runtime.submit_generate(PROMPT, n=4, steps=100)
    behind = runtime.submit_generate(PROMPT, n=1, steps=2)
    _wait(lambda: big.progress[0] >= 1)
    assert runtime.stats()["queue_depth"] == 2  # three images of `big` wait, and `behind` after them
    big.cancel()
    with pytest.raises(RequestCancelled):
        big.result(timeout=60)
    assert len(behind.result(timeout=60)) == 1
    _wait(lambda: runtime.stats()["active_generation_rows"] == 0 and runtime.stats()["queue_depth"] == 0)
    runtime.close()


def test_an_image_request_runs_only_serving_and_core_code(build_dir):
    # The layout's measure (docs/architecture.md): from the route to the engine calls and back, a
    # request runs runtime/ and jfexport/core/ code only, never the reference, tooling or exporter.
    from jfexport.tools.request_path import request_files

    files = [f for f in request_files(build_dir) if f != "jfexport/tools/request_path.py"]
    assert "runtime/serving/image_gen.py" in files and "runtime/batching/generation_step.py" in files
    assert "runtime/backends/ort_backend.py" in files  # the engine calls are inside the measured span
    assert [f for f in files if not f.startswith(("runtime/", "jfexport/core/"))] == []
