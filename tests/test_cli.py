"""The CLI on the bundled default model, as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from .conftest import REPO, run_cli


@pytest.fixture(params=["torch", "engines"])
def model_choice(request) -> list[str]:
    """Both ways `generate` and `chat` run, named rather than left to whether the checkout holds a build
    (CI's does not; a developer's usually does), so each run of the suite covers both."""
    if request.param == "torch":
        return ["--backend", "torch"]
    return ["--engines", str(request.getfixturevalue("default_build"))]


def test_generate_writes_pngs_and_chat_answers(tmp_path, model_choice):
    res = run_cli("generate", "a red circle at the top left", "-n", "2", "--steps", "3", "-o", str(tmp_path),
                  *model_choice)
    assert res.returncode == 0, res.stderr
    paths = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in paths] == ["image_0.png", "image_1.png"]
    img = Image.open(paths[0])
    assert img.mode == "RGB" and img.size[0] == img.size[1] > 0
    assert not list(tmp_path.glob("*.tmp"))
    res = run_cli("chat", "--image", str(paths[0]), "What colour is the shape?", "--max-new-tokens", "4", *model_choice)
    # The bundled default model draws the red circle it was asked for and reads its colour back.
    assert res.returncode == 0 and res.stdout == " red\n", (res.stdout, res.stderr)


def test_bad_inputs_fail_with_a_message(tmp_path):
    res = run_cli("generate", "   ", "--steps", "1", "-o", str(tmp_path))
    assert res.returncode != 0 and "empty prompt" in res.stderr
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x00garbage")
    res = run_cli("chat", "--image", str(bad), "what?")
    assert res.returncode != 0 and "x.png" in res.stderr and "not a readable image" in res.stderr
    res = run_cli("chat", "--image", str(tmp_path / "missing.png"), "what?")
    assert res.returncode != 0 and "missing.png" in res.stderr


def test_bench_writes_json_with_every_stage(tmp_path):
    import json

    out = tmp_path / "bench.json"
    res = run_cli("bench", "--steps", "2", "--runs", "1", "--warmup", "0", "--max-new-tokens", "3", "--json", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert json.loads(res.stdout) == data
    generation = data["generation"]
    stages = generation["stages_per_call"]
    assert {"embed_tokens", "llm_prefill", "gen_encoder", "llm_decode", "gen_decoder", "vae_decoder"} <= set(stages)
    assert stages["gen_encoder"]["runs"] == stages["gen_decoder"]["runs"] == 2  # one call per step
    engine_ms = generation["end_to_end"]["median_ms"]
    reference_ms = generation["reference_eager_end_to_end"]["median_ms"]
    assert engine_ms > 0 and reference_ms > 0
    assert generation["speedup_vs_reference"] == pytest.approx(reference_ms / engine_ms, rel=1e-9)
    # One run, at most two calls per stage: median x calls is each stage's total time in that run,
    # and the stages run inside the end-to-end call.
    assert sum(s["median_ms"] * s["runs"] for s in stages.values()) <= engine_ms
    understanding = data["understanding"]
    assert 1 <= understanding["tokens_per_answer"] <= 3
    assert 0 < understanding["time_to_first_token"]["median_ms"] and data["peak_rss_mib"] > 0
    # Honest about what it compares, under which threads, and how much the runs spread.
    first = res.stderr.splitlines()[0]
    assert first.startswith("the runtime on the torch backend") and "vs the PyTorch eager reference" in first
    assert "1 thread each" in first and data["compared"] in first
    assert data["threads"]["reference_torch"] == data["threads"]["runtime"]["scheduler_torch"] == 1
    end_to_end = generation["end_to_end"]
    assert end_to_end["min_ms"] <= end_to_end["median_ms"] <= end_to_end["max_ms"]
    low, high = generation["speedup_vs_reference_min_max"]
    assert low <= generation["speedup_vs_reference"] <= high


def test_bench_torch_runs_on_cpu_at_a_small_preset(tmp_path):
    import json

    out = tmp_path / "paths.json"
    res = run_cli("bench-torch", "--steps", "2", "--runs", "1", "--warmup", "0", "--batches", "1",
                  "--max-new-tokens", "2", "--no-compile", "--json", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert "fast_compiled_eager" not in data["serving_through_the_scheduler"]["batch_1"]
    row = data["generation"]["batch_1"]
    assert row["a_official_eager_recompute"]["floor_ms"] > 0 and row["b_eager_prompt_kv"]["median_ms"] > 0
    assert row["c_cuda_graph_step"] is None  # no CUDA device here


@pytest.fixture(scope="module")
def engines(default_build):
    return default_build


def test_generate_more_images_than_one_engine_call_and_say_which_prompt_made_each(engines, tmp_path):
    import hashlib
    import json

    prompts = ["a red circle at the top left", "a blue square at the bottom right", "a green triangle in the center"]
    # 3 prompts x 4 images are 24 rows under CFG; the build's engine calls take 16.
    res = run_cli("generate", *prompts, "-n", "4", "--steps", "2", "--seed", "3", "--engines", str(engines),
                  "-o", str(tmp_path))
    assert res.returncode == 0, res.stderr
    paths = [tmp_path / f"image_{i}.png" for i in range(12)]
    assert res.stdout.split() == [str(p) for p in paths]
    manifest = (engines / "manifest.json").read_bytes()
    for i, path in enumerate(paths):
        image = Image.open(path)
        record = json.loads(image.text["jfexport"])
        assert image.text["Description"] == record["prompt"] == prompts[i // 4]
        assert (record["index"], record["seed"], record["steps"], record["cfg"]) == (i, 3, 2, 2.0)
        assert record["request"] == {"prompts": prompts, "n": 4}
        assert record["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
        assert record["model_fingerprint"] == json.loads(manifest)["model"]["fingerprint"]
    # The record is enough to draw an image again: the same request, alone.
    again = tmp_path / "again"
    record = json.loads(Image.open(paths[5]).text["jfexport"])
    res = run_cli("generate", *record["request"]["prompts"], "-n", str(record["request"]["n"]), "--steps",
                  str(record["steps"]), "--cfg", str(record["cfg"]), "--seed", str(record["seed"]), "--engines",
                  str(engines), "-o", str(again))
    assert res.returncode == 0, res.stderr
    assert Image.open(again / "image_5.png").tobytes() == Image.open(paths[5]).tobytes()


def test_generate_writes_previews_named_after_their_image_and_the_same_images(engines, tmp_path):
    prompts = ["a red circle at the top left", "a blue square at the bottom right"]
    common = ["-n", "2", "--steps", "4", "--seed", "5", "--engines", str(engines)]
    res = run_cli("generate", *prompts, *common, "-o", str(tmp_path / "plain"))
    assert res.returncode == 0, res.stderr
    res = run_cli("generate", *prompts, *common, "-o", str(tmp_path / "out"), "--previews", str(tmp_path / "pre"),
                  "--num-previews", "2")
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in (tmp_path / "pre").iterdir())
    assert names == [f"image_{i}_preview_{j}.png" for i in range(4) for j in range(2)]
    for i in range(4):
        image = Image.open(tmp_path / "out" / f"image_{i}.png")
        assert image.tobytes() == Image.open(tmp_path / "plain" / f"image_{i}.png").tobytes()
        assert Image.open(tmp_path / "pre" / f"image_{i}_preview_0.png").size == image.size
    # Previews already there are not replaced without --overwrite, and nothing is sampled for that.
    res = run_cli("generate", prompts[0], *common, "-o", str(tmp_path / "more"), "--previews", str(tmp_path / "pre"))
    assert res.returncode != 0 and "image_0_preview_0.png" in res.stderr and "--overwrite" in res.stderr
    assert not (tmp_path / "more").exists() or not list((tmp_path / "more").iterdir())
    res = run_cli("generate", prompts[0], "--steps", "2", "--engines", str(engines), "-o", str(tmp_path / "x"),
                  "--previews", str(tmp_path / "pre2"), "--num-previews", "2")
    assert res.returncode != 0 and "--num-previews: 2 previews need at least 3 steps" in res.stderr


def test_bench_of_a_build_names_both_sides_and_gives_them_the_same_threads(engines, tmp_path):
    import json

    out = tmp_path / "bench.json"
    res = run_cli("bench", "--engines", str(engines), "--precisions", "fp32", "--threads", "2", "--steps", "2",
                  "--runs", "2", "--warmup", "0", "--max-new-tokens", "3", "--json", str(out))
    assert res.returncode == 0, res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"ONNX Runtime engines (fp32) of {engines} vs the PyTorch eager reference")
    assert "2 threads each" in first and "interleaved" in first
    data = json.loads(out.read_text())
    assert data["threads"] == {"reference_torch": 2, "fp32": {"scheduler_torch": 2, "onnxruntime_intra_op": [2]}}
    for side in (data["precisions"]["fp32"], data["reference_eager"]):
        timing = side["end_to_end"]
        assert timing["runs"] == 2 and timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]


@pytest.mark.parametrize("stdout", ["full", "closed"])
def test_a_standard_output_that_fails_is_named_and_loses_no_image(engines, tmp_path, stdout):
    """The paths are printed once every image is written: a full disk (/dev/full) or a reader that closed
    the pipe gets `error: cannot write to standard output`, exit 2, and all the images."""
    command = [sys.executable, "-m", "jfexport.cli", "generate", "a red circle", "-n", "3", "--steps", "2",
               "--engines", str(engines), "-o", str(tmp_path / "out")]
    if stdout == "full":
        with open("/dev/full", "w") as full:
            res = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300, cwd=REPO)
        message = "(No space left on device)"
    else:
        read, write = os.pipe()
        os.close(read)  # the reader is gone before anything is written
        try:
            res = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300, cwd=REPO)
        finally:
            os.close(write)
        message = "(Broken pipe)"
    assert res.returncode == 2 and f"error: cannot write to standard output {message}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["image_0.png", "image_1.png", "image_2.png"]


def test_a_checkpoint_without_a_vae_is_named_before_sampling(tmp_path):
    checkpoint = tmp_path / "no-vae"
    shutil.copytree(REPO / "reference" / "assets" / "default", checkpoint, ignore=shutil.ignore_patterns("vae"))
    res = run_cli("generate", "a red circle", "--steps", "2", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "o"))
    assert res.returncode == 2 and "no VAE loaded" in res.stderr and "sampling" not in res.stderr, res.stderr


def test_a_refused_generate_leaves_no_folder_it_created(tmp_path):
    """Refused once its folders are made (the build named is not there): those it made are removed."""
    kept = tmp_path / "kept"
    kept.mkdir()
    res = run_cli("generate", "a red circle", "--steps", "4", "-o", str(tmp_path / "new" / "deeper"), "--previews",
                  str(kept / "previews"), "--engines", str(tmp_path / "no-build"))
    assert res.returncode == 2 and "engines folder does not exist" in res.stderr, res.stderr
    assert not (tmp_path / "new").exists() and list(kept.iterdir()) == []


def test_a_blank_prompt_is_refused_before_anything_is_loaded_or_made(tmp_path):
    res = run_cli("generate", "a red circle", " ", "-o", str(tmp_path / "out"), "--engines", str(tmp_path / "no-build"))
    assert res.returncode == 2 and "error: PROMPTS[1]: empty prompt" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_a_disk_too_small_for_the_images_is_named_before_sampling(engines, tmp_path):
    """A real full-ish disk (a 64 KiB tmpfs): a probe file fits where eight images would not."""
    out = tmp_path / "small"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        res = run_cli("generate", "a red circle", "-n", "8", "--steps", "2", "--engines", str(engines), "-o", str(out))
        assert res.returncode == 2 and "free, the images need up to" in res.stderr, res.stderr
        assert "sampling" not in res.stderr and list(out.iterdir()) == []
        fits = run_cli("generate", "a red circle", "--steps", "2", "--engines", str(engines), "-o", str(out))
        assert fits.returncode == 0 and [p.name for p in out.iterdir()] == ["image_0.png"], fits.stderr
    finally:
        subprocess.run(["umount", str(out)], check=True)
