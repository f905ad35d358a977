"""What `jfexport build` says and keeps when a build of a folder changes precisions."""

from __future__ import annotations

import json

from .conftest import copy_build, run_cli


def _files(out) -> dict[str, dict[str, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {n: {p: f["file"] for p, f in g["files"].items()} for n, g in manifest["graphs"].items()}


def test_fp16_after_a_plain_build_reuses_the_fp32_graphs_and_a_plain_build_says_it_removes_fp16(tiny_build, tmp_path):
    out = copy_build(tiny_build, tmp_path / "engines")  # a plain build of the tiny preset
    plain = _files(out)
    fp32_bytes = {n: (out / f["fp32"]).read_bytes() for n, f in plain.items()}

    res = run_cli("build", "--preset", "tiny", "--out", str(out), "--fp16")
    assert res.returncode == 0, res.stderr
    typed = _files(out)
    # The fp32 graphs stay where they were, untouched: no second copy in a build-<id>/ folder.
    assert {n: f["fp32"] for n, f in typed.items()} == {n: f["fp32"] for n, f in plain.items()}
    assert {n: (out / f["fp32"]).read_bytes() for n, f in typed.items()} == fp32_bytes
    assert not list(out.glob("build-*"))
    assert "[fp32]: exporting" not in res.stderr  # nothing exported at fp32
    assert {n for n, f in typed.items() if "fp16" in f} == set(typed) - {"vae_decoder"}
    assert "vae_decoder: up to date (fp32: the SDXL VAE overflows in fp16)" in res.stderr
    assert "vae_decoder: built" not in res.stderr
    assert "kept fp32: " in res.stderr and "added fp16 to llm_prefill" in res.stdout

    res = run_cli("build", "--preset", "tiny", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert _files(out) == plain and not list(out.glob("*.fp16*"))
    removed = next(line for line in res.stderr.splitlines() if line.startswith("removed fp16: "))
    assert "llm_prefill" in removed and "vae_decoder" not in removed and "--fp16" in removed
    assert res.stdout.strip().endswith("everything up to date")
