"""The LLM: transformers' LlamaForCausalLM for the weights, and our own forward over its modules.

The official pipelines call the HF model; an exporter needs a forward with explicit inputs
(embeddings, 2-D padding mask, absolute position ids, flat past K/V) and no cache classes or
mask builders whose tracing changes between transformers releases (JANUSFLOW.md pitfalls 7, 18).
`llama_forward` is that forward; tests hold it to the HF model's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ..config import LanguageConfig

KV = tuple[torch.Tensor, torch.Tensor]


def build_llama(cfg: LanguageConfig) -> LlamaForCausalLM:
    hf_cfg = LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        hidden_act="silu",
    )
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> KV:
    """cos/sin [B,1,T,head_dim] for HF's rotate-half RoPE, computed in fp32 then cast (as HF does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_bias(attention_mask: torch.Tensor, num_new: int, dtype: torch.dtype,
                   query_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Additive [B,1,T,P+T] bias: causal over absolute positions plus the 2-D key padding mask.

    The T queries sit at the end of the key sequence, or at `query_slots` [T] when the keys are a
    static buffer. A finite minimum (not -inf) keeps fully padded query rows finite under left padding.
    """
    total = attention_mask.shape[1]
    if query_slots is None:
        q_pos = torch.arange(num_new, device=attention_mask.device)[:, None] + (total - num_new)
    else:
        q_pos = query_slots[:, None]
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]
    visible = (k_pos <= q_pos)[None] & attention_mask[:, None, :].bool()
    neg = torch.finfo(dtype).min
    return torch.where(visible, 0.0, neg).to(dtype)[:, None]


def llama_forward(
    model: LlamaForCausalLM,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    rope_theta: float,
    past: list[KV] | None = None,
    output_hidden_layer: int | None = None,
    attention: str = "math",
    write_slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[KV], torch.Tensor | None]:
    """Run the decoder stack.

    inputs_embeds [B,T,D]; attention_mask [B,P+T] (1 = visible); position_ids [B,T]; past: per layer
    (key, value) [B,Hkv,P,Dh] after RoPE. Returns (hidden states after the final norm [B,T,D],
    present K/V [B,Hkv,P+T,Dh] per layer, and the residual stream after block
    `output_hidden_layer` if asked — REPA reads it during training). `attention="math"` spells
    the softmax out in fp32 (what graphs export); "sdpa" uses PyTorch's fused kernels (GPU path).

    With `write_slots` [T], `past` holds static buffers [B,Hkv,L,Dh] spanning the whole
    attention_mask [B,L]: the new K/V are written into them in place at those slots and attention
    reads the full buffers (unfilled slots masked), so shapes never change between decode steps.
    """
    cfg = model.config
    body = model.model
    bsz, num_new, _ = inputs_embeds.shape
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    dtype = inputs_embeds.dtype
    cos, sin = rope_tables(position_ids, head_dim, rope_theta, dtype)
    bias = attention_bias(attention_mask, num_new, dtype, write_slots)
    h = inputs_embeds
    present: list[KV] = []
    captured = None
    for i, layer in enumerate(body.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(bsz, num_new, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, num_new, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(bsz, num_new, kv_heads, head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if write_slots is not None:
            k = past[i][0].index_copy_(2, write_slots, k)
            v = past[i][1].index_copy_(2, write_slots, v)
        elif past is not None:
            k = torch.cat([past[i][0], k], dim=2)
            v = torch.cat([past[i][1], v], dim=2)
        present.append((k, v))
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        if attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) * head_dim**-0.5 + bias
            # Upcast before the softmax (not softmax(dtype=...)): exported, that form becomes an
            # fp16 Softmax followed by a Cast, losing the fp32 island.
            out = torch.matmul(F.softmax(scores.float(), dim=-1).to(dtype), v)
        out = out.transpose(1, 2).reshape(bsz, num_new, heads * head_dim)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if output_hidden_layer is not None and i + 1 == output_hidden_layer:
            captured = h
    return body.norm(h), present, captured
