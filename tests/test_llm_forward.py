"""Our explicit-input Llama forward equals transformers' LlamaForCausalLM, with and without K/V."""

from __future__ import annotations

import torch

from jfexport.core.layout import understanding_positions


def test_matches_transformers_with_left_padding(tiny_bundle):
    model = tiny_bundle.model
    lm = model.language_model
    torch.manual_seed(0)
    embeds = torch.randn(2, 9, model.config.language.hidden_size)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    positions = understanding_positions(mask)
    with torch.no_grad():
        ours, _, _ = model.llm(embeds, mask, positions)
        ref = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    valid = mask.bool()
    assert (ours[valid] - ref[valid]).abs().max().item() < 1e-5


def test_prefill_then_decode_equals_full_forward(tiny_bundle):
    model = tiny_bundle.model
    torch.manual_seed(1)
    embeds = torch.randn(3, 7, model.config.language.hidden_size)
    mask = torch.ones(3, 7, dtype=torch.long)
    pos = torch.arange(7).expand(3, 7)
    with torch.no_grad():
        full, _, _ = model.llm(embeds, mask, pos)
        _, past, _ = model.llm(embeds[:, :4], mask[:, :4], pos[:, :4])
        tail, present, _ = model.llm(embeds[:, 4:], mask, pos[:, 4:], past)
    assert (full[:, 4:] - tail).abs().max().item() < 1e-5
    assert present[0][0].shape[2] == 7


def test_fused_attention_equals_the_explicit_softmax(tiny_bundle):
    model = tiny_bundle.model
    torch.manual_seed(3)
    embeds = torch.randn(2, 6, model.config.language.hidden_size)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    pos = understanding_positions(mask)
    with torch.no_grad():
        math, _, _ = model.llm(embeds, mask, pos)
        model.attention = "sdpa"
        try:
            fused, _, _ = model.llm(embeds, mask, pos)
        finally:
            model.attention = "math"
    assert (math[mask.bool()] - fused[mask.bool()]).abs().max().item() < 1e-5
