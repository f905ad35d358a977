"""Sequence layout shared by the reference pipelines and the runtime: CFG rows, masks, positions.

These are the official conventions (JANUSFLOW.md 4.2, 4.6) extended to left-padded batches so
that batching never changes a row's result: every row's positions start at 0 on its BOS.
"""

from __future__ import annotations

import torch


def left_pad_counts(attention_mask: torch.Tensor) -> torch.Tensor:
    """Leading zeros per row of a left-padded [B,L] mask."""
    return (attention_mask.cumsum(dim=1) == 0).sum(dim=1)


def offset_positions(pad: torch.Tensor, length: int) -> torch.Tensor:
    """[B,length] absolute positions `arange - pad`, clamped at 0 on the (masked) left pads.

    Masked positions *inside* a row still consume indices, as in the official generation path,
    which never derives positions from the mask.
    """
    pos = torch.arange(length, device=pad.device)[None, :] - pad[:, None]
    return pos.clamp_min(0)


def uncond_rows(cond_ids: torch.Tensor, cond_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional version of each prompt row: its BOS, then pad ids that are all masked out
    (official: `tokens[B:, 1:] = pad_id`). Training's dropped prompts use exactly this."""
    pad = left_pad_counts(cond_mask)
    rows = torch.arange(cond_ids.shape[0], device=cond_ids.device)
    uncond_ids = torch.full_like(cond_ids, pad_id)
    uncond_ids[rows, pad] = cond_ids[rows, pad]
    uncond_mask = torch.zeros_like(cond_mask)
    uncond_mask[rows, pad] = 1
    return uncond_ids, uncond_mask


def cfg_prompt_rows(cond_ids: torch.Tensor, cond_mask: torch.Tensor,
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cond + uncond rows for classifier-free guidance, with the last prompt token dropped.

    Returns (ids [2B,L-1], mask [2B,L-1], left-pad counts [2B]).
    """
    pad = left_pad_counts(cond_mask)
    uncond_ids, uncond_mask = uncond_rows(cond_ids, cond_mask, pad_id)
    ids = torch.cat([cond_ids, uncond_ids])[:, :-1]
    mask = torch.cat([cond_mask, uncond_mask])[:, :-1]
    return ids, mask, torch.cat([pad, pad])


def understanding_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions for left-padded understanding prompts, as `generate()` derives them: cumsum(mask) - 1."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


def image_gather_index(images_seq_mask: torch.Tensor, images_emb_mask: torch.Tensor) -> torch.Tensor:
    """[B*L] index over `cat([text [B*L], image blocks [B*n*(1+N)]])` that splices the image blocks in.

    The official splice (`embeds[images_seq_mask] = blocks[images_emb_mask]`) as a gather: position p
    takes text embedding p, or, where the prompt holds an image token, the next image embedding in
    order. The index is computed on the host side of a step, so the gather itself has static shapes
    (a CUDA graph can hold it, the masked assignment cannot).
    images_seq_mask [B,L]; images_emb_mask [B,n,1+N].
    """
    seq = images_seq_mask.flatten()
    index = torch.arange(seq.numel(), device=seq.device)
    index[seq.nonzero().flatten()] = seq.numel() + images_emb_mask.flatten().to(seq.device).nonzero().flatten()
    return index


def splice_image_embeds(text_embeds: torch.Tensor, image_embeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """text_embeds [B,L,D] with the image blocks `image_embeds` [B*n,1+N,D] spliced in at `index`
    (`image_gather_index`), in the text's dtype."""
    b, length, dim = text_embeds.shape
    flat = torch.cat([text_embeds.reshape(b * length, dim), image_embeds.reshape(-1, dim).to(text_embeds.dtype)])
    return flat.index_select(0, index).view(b, length, dim)
