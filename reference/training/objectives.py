"""One training loss per data kind, computed through the same model paths inference uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from jfexport.core.layout import left_pad_counts, offset_positions, uncond_rows, understanding_positions
from jfexport.core.processor import JanusProcessor
from jfexport.core.processor.image import preprocess_image

from ..modules.janusflow import JanusFlowModel
from .losses import IGNORE, RepaHead, ar_loss, logit_normal, repa_loss, rf_loss


def _left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([[value] * (width - len(r)) + r for r in rows], dtype=torch.long)


def generation_loss(
    model: JanusFlowModel, vae, processor: JanusProcessor, prompts: list[str], images: torch.Tensor,
    generator: torch.Generator, prompt_drop: float, logit_mean: float, logit_std: float,
    repa_head: RepaHead | None = None, repa_layer: int | None = None,
) -> dict[str, torch.Tensor]:
    """L_RF (+ L_REPA) on images [B,3,H,W] in [-1,1] with their captions.

    Dropped prompts become exactly inference's unconditional rows; the sequence is laid out as at
    inference: prompt without its final tag, the time embedding in the tag's slot, the N tokens.
    """
    tok = processor.tokenizer
    batch = processor.generation_tokens(prompts)
    ids, mask = batch.input_ids, batch.attention_mask
    drop = torch.rand(ids.shape[0], generator=generator) < prompt_drop
    u_ids, u_mask = uncond_rows(ids, mask, tok.pad_id)
    ids = torch.where(drop[:, None], u_ids, ids)[:, :-1]
    mask = torch.where(drop[:, None], u_mask, mask)[:, :-1]
    with torch.no_grad():  # the VAE is frozen
        x = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    z0 = torch.randn(x.shape, generator=generator)
    t = logit_normal(x.shape[0], logit_mean, logit_std, generator)
    zt = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * z0
    z_emb, t_emb, skip = model.gen_encode(zt, t * 1000)
    n_img = z_emb.shape[1]
    embeds = torch.cat([model.embed_tokens(ids), t_emb[:, None], z_emb], dim=1)
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1 + n_img)], dim=1)
    positions = offset_positions(left_pad_counts(mask), embeds.shape[1])
    hidden, _, captured = model.llm(embeds, full_mask, positions, output_hidden_layer=repa_layer)
    velocity = model.gen_decode(hidden[:, -n_img:], skip, t_emb)
    out = {"rf": rf_loss(velocity, x, z0)}
    if repa_head is not None and repa_layer is not None:
        if captured is None:
            raise RuntimeError(f"the LLM returned no hidden state for output_hidden_layer={repa_layer}")
        out["repa"] = repa_loss(repa_head(captured[:, -n_img:]), _encoder_targets(model, images, skip.shape[-1]))
    return out


@torch.no_grad()
def _encoder_targets(model: JanusFlowModel, images: torch.Tensor, grid: int) -> torch.Tensor:
    """Understanding-encoder features of the clean images on the generation grid (stop-gradient)."""
    und = model.config.vision_und
    pixels = F.interpolate(images, size=(und.image_size, und.image_size), mode="bicubic", antialias=True,
                           align_corners=False).clamp(-1, 1)
    feats = model.vision_und_enc_model(pixels)  # [B, g_u^2, W]
    b, n, w = feats.shape
    g_u = und.grid
    feats = feats.transpose(1, 2).reshape(b, w, g_u, g_u)
    if g_u != grid:
        feats = F.adaptive_avg_pool2d(feats, grid)
    return feats.flatten(2).transpose(1, 2)


def understanding_loss(model: JanusFlowModel, processor: JanusProcessor, images: list[Image.Image], questions: list[str],
                       answers: list[str]) -> dict[str, torch.Tensor]:
    """L_AR on the answers only: prompt (with the image block) + " answer" + EOS."""
    tok = processor.tokenizer
    rows, labels = [], []
    for q, a in zip(questions, answers):
        prompt = processor.understanding_ids(q)
        reply = tok.encode(" " + a)[1:] + [tok.eos_id]
        rows.append(prompt + reply)
        labels.append([IGNORE] * len(prompt) + reply)
    ids, targets = _left_pad(rows, tok.pad_id), _left_pad(labels, IGNORE)
    mask = _left_pad([[1] * len(r) for r in rows], 0)
    seq_mask = ((ids == tok.image_id) | (ids == tok.image_start_id)) & mask.bool()
    pixels = torch.stack([preprocess_image(img, processor.image_size, processor.mean, processor.std) for img in images])
    emb_mask = torch.ones(len(rows), 1, processor.num_image_tokens + 1, dtype=torch.bool)
    embeds = model.prepare_inputs_embeds(ids, pixels[:, None], seq_mask, emb_mask)
    hidden, _, _ = model.llm(embeds, mask, understanding_positions(mask))
    return {"ar": ar_loss(model.logits(hidden), targets)}


def text_loss(model: JanusFlowModel, processor: JanusProcessor, texts: list[str]) -> dict[str, torch.Tensor]:
    tok = processor.tokenizer
    rows = [tok.encode(t) + [tok.eos_id] for t in texts]
    ids, targets = _left_pad(rows, tok.pad_id), _left_pad(rows, IGNORE)
    mask = _left_pad([[1] * len(r) for r in rows], 0)
    hidden, _, _ = model.llm(model.embed_tokens(ids), mask, understanding_positions(mask))
    return {"text": ar_loss(model.logits(hidden), targets)}
