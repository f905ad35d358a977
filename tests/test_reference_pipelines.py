"""Sampler and decoder semantics: CFG rows, schedules, batching invariance, bf16 time table."""

from __future__ import annotations

import torch
from jfexport.reference.pipelines.generation import sample_latents
from jfexport.reference.pipelines.understanding import decode_tokens

from jfexport.core.layout import cfg_prompt_rows, offset_positions
from jfexport.core.schedulers import euler_schedule

PAD = 2


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_cfg_rows_keep_bos_and_mask_everything_else():
    ids, mask = _left_pad([[1, 10, 11, 12, 9], [1, 20, 9]])
    rows, rows_mask, pad = cfg_prompt_rows(ids, mask, PAD)
    assert rows.tolist() == [[1, 10, 11, 12], [PAD, PAD, 1, 20], [1, PAD, PAD, PAD], [PAD, PAD, 1, PAD]]
    assert rows_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 1, 0]]
    # Positions start at 0 on each row's BOS; masked pads inside the uncond row still count.
    assert offset_positions(pad, 6).tolist()[1] == [0, 0, 0, 1, 2, 3]


def test_bf16_schedule_reproduces_the_official_values():
    t, dt = euler_schedule(30, torch.bfloat16)
    assert dt.item() == 0.033447265625
    assert t[:6].float().tolist() == [0, 33.25, 66.5, 100, 133, 167]
    assert t[-1].item() == 968


def _latents(bundle, ids, mask, z0, schedule="cached"):
    return sample_latents(bundle.model, ids, mask, z0, 2, 3.0, PAD, schedule=schedule)


def test_batching_does_not_change_a_prompt(tiny_bundle):
    rows = [[1, 30, 31, 32, 33, 34, 9], [1, 40, 41, 9]]
    size = tiny_bundle.latent_size
    z0 = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0))
    ids, mask = _left_pad(rows)
    together = _latents(tiny_bundle, ids, mask, z0)
    for i, row in enumerate(rows):
        alone = _latents(tiny_bundle, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), z0[i : i + 1])
        assert (alone[0] - together[i]).abs().max().item() < 1e-5


def test_cached_and_recompute_schedules_agree(tiny_bundle):
    ids, mask = _left_pad([[1, 30, 31, 32, 9], [1, 40, 9]])
    size = tiny_bundle.latent_size
    z0 = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(1))
    a = _latents(tiny_bundle, ids, mask, z0, "cached")
    b = _latents(tiny_bundle, ids, mask, z0, "recompute")
    assert (a - b).abs().max().item() < 1e-5


def test_greedy_decoding_is_batch_invariant(tiny_bundle):
    model = tiny_bundle.model
    d = model.config.language.hidden_size
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 6, d, generator=gen), torch.randn(1, 3, d, generator=gen)
    embeds = torch.cat([a, torch.cat([torch.zeros(1, 3, d), b], dim=1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    eos = 10_000  # never produced: decode the full budget
    batched = torch.stack(list(decode_tokens(model, embeds, mask, 5, eos)), 1)
    for i, x in enumerate((a, b)):
        alone = torch.stack(list(decode_tokens(model, x, torch.ones(1, x.shape[1], dtype=torch.long), 5, eos)), 1)
        assert torch.equal(alone[0], batched[i])
