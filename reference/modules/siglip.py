"""Understanding encoder: a SigLIP ViT built on transformers' SiglipVisionModel.

The official tower is a timm VisionTransformer (fused qkv, `blocks.N`, `pos_embed`). transformers'
SiglipVisionModel computes the same function when configured with exact GELU, no pooling head and
the official LayerNorm eps; only the parameter names differ, so the checkpoint is remapped on load
and fused back on save (`timm_to_hf` / `hf_to_timm`).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from jfexport.core.config import VisionUndConfig

# Official key prefix of the tower inside the JanusFlow state dict.
TOWER_PREFIX = "vision_und_enc_model.vision_tower."
# Weights of the timm attention-pool head: built by the official code, never run (ignore_head=True).
UNUSED_PREFIX = TOWER_PREFIX + "attn_pool."

_BLOCK_MAP = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def build_siglip(cfg: VisionUndConfig) -> SiglipVisionModel:
    hf_cfg = SiglipVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_blocks,
        num_attention_heads=cfg.heads,
        num_channels=3,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu",  # the official tower forces exact-erf nn.GELU
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        vision_use_head=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    return SiglipVisionModel(hf_cfg)


class VisionUnderstandingTower(nn.Module):
    """pixel_values [B,3,S,S] (already normalised) -> patch features [B,N,width] after the final LayerNorm."""

    def __init__(self, cfg: VisionUndConfig):
        super().__init__()
        self.vision_tower = build_siglip(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixel_values=pixel_values).last_hidden_state


def timm_to_hf(official: dict[str, torch.Tensor], hf_prefix: str) -> dict[str, torch.Tensor]:
    """Rename the official (timm) tower keys to SiglipVisionModel keys under `hf_prefix`.

    Keys outside the tower pass through untouched; unknown tower keys are kept under their
    official name so the strict load reports them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in official.items():
        if not key.startswith(TOWER_PREFIX):
            out[key] = value
            continue
        name = key[len(TOWER_PREFIX):]
        if name == "pos_embed":
            out[hf_prefix + "embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])
        elif name.startswith("patch_embed.proj."):
            out[hf_prefix + "embeddings.patch_embedding." + name.rsplit(".", 1)[1]] = value
        elif name.startswith("norm."):
            out[hf_prefix + "post_layernorm." + name.rsplit(".", 1)[1]] = value
        elif (m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", name)) is not None:
            layer, kind = m.groups()
            # timm's qkv rows are [q; k; v] (reshape (3, heads, head_dim) on the output features).
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{hf_prefix}encoder.layers.{layer}.self_attn.{part}.{kind}"] = chunk.contiguous()
        elif (m := re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", name)) is not None:
            layer, module, kind = m.groups()
            out[f"{hf_prefix}encoder.layers.{layer}.{_BLOCK_MAP[module]}.{kind}"] = value
        else:
            out[key] = value
    return out


def official_key(key: str, hf_prefix: str) -> str:
    """Official name of one model key (q/k/v projections map to their fused `qkv`)."""
    if not key.startswith(hf_prefix):
        return key
    name = key[len(hf_prefix):]
    inverse_block = {v: k for k, v in _BLOCK_MAP.items()}
    if name == "embeddings.position_embedding.weight":
        return TOWER_PREFIX + "pos_embed"
    if name.startswith("embeddings.patch_embedding."):
        return TOWER_PREFIX + "patch_embed.proj." + name.rsplit(".", 1)[1]
    if name.startswith("post_layernorm."):
        return TOWER_PREFIX + "norm." + name.rsplit(".", 1)[1]
    if (m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)", name)) is not None:
        return f"{TOWER_PREFIX}blocks.{m.group(1)}.attn.qkv.{m.group(2)}"
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|self_attn\.out_proj|mlp\.fc1|mlp\.fc2)"
                     r"\.(weight|bias)", name)
    if m is None:
        raise KeyError(f"no official name for tower parameter {key!r}")
    layer, module, kind = m.groups()
    return f"{TOWER_PREFIX}blocks.{layer}.{inverse_block[module]}.{kind}"


def hf_to_timm(state: dict[str, torch.Tensor], hf_prefix: str) -> dict[str, torch.Tensor]:
    """Inverse of `timm_to_hf`: fuse q/k/v back and restore the official names."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = official_key(key, hf_prefix)
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            qkv.setdefault(name, {})[key.split(".")[-2]] = value
        elif name == TOWER_PREFIX + "pos_embed":
            out[name] = value.unsqueeze(0)
        else:
            out[name] = value
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], 0)
    return out
