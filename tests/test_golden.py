"""The reference computes the same function as the official implementation (official-A goldens)."""

from __future__ import annotations

import torch
from jfexport.reference.golden import verify_golden
from jfexport.reference.pipelines.generation import sample_latents

from .conftest import OFFICIAL_A, run_cli


def test_verify_reference_cli_passes_on_official_a(official_a_dir):
    res = run_cli("verify-reference", "--checkpoint", str(official_a_dir), "--golden", str(OFFICIAL_A / "golden.safetensors"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "und.logits" in res.stdout and "gen.z_final" in res.stdout and "encdec.dec_out" in res.stdout
    assert "FAIL" not in res.stdout


def test_every_golden_tensor_is_checked(official_a_model, golden_a):
    names = {r.name for r in verify_golden(official_a_model, golden_a)}
    inputs = ("_rows", "_pos", "_mask", ".z0", ".prompt_ids", ".pixel_values", ".input_ids", ".cfg_weight", ".dec_x", "encdec.z",
              "encdec.t")
    outputs = {k for k in golden_a.tensors if not k.endswith(inputs)}
    outputs.discard("gen.tokens")
    assert outputs <= names, outputs - names


def test_a_real_mistake_fails_verification(official_a_model, golden_a):
    """Zeroing beg_of_und_embed (a plausible loader bug) must be caught."""
    saved = official_a_model.beg_of_und_embed.detach().clone()
    try:
        with torch.no_grad():
            official_a_model.beg_of_und_embed.zero_()
        bad = {r.name for r in verify_golden(official_a_model, golden_a) if not r.ok}
    finally:
        with torch.no_grad():
            official_a_model.beg_of_und_embed.copy_(saved)
    assert "und.image_embeds" in bad and "und.logits" in bad


def test_official_full_recompute_matches_prompt_cache(official_a_model, golden_a):
    prompts, z0 = golden_a["gen.prompt_ids"], golden_a["gen.z0"]
    args = (official_a_model, prompts, torch.ones_like(prompts), z0, 2, 2.0, int(golden_a.special["pad"]))
    cached = sample_latents(*args, schedule="cached")
    recompute = sample_latents(*args, schedule="recompute")
    assert (cached - recompute).abs().max().item() < 2e-5
