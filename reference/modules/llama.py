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

from jfexport.core.config import LanguageConfig

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
        # transformers 5 keeps RoPE settings in rope_parameters (a bare rope_theta is moved there).
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
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

    The T queries sit at the end of the key sequence, or at `query_slots` [B,T] (each row's own
    columns) when the keys are a static buffer. A finite minimum (not -inf) keeps fully padded
    query rows finite under left padding.
    """
    total = attention_mask.shape[1]
    if query_slots is None:
        q_pos = (torch.arange(num_new, device=attention_mask.device)[:, None] + (total - num_new))[None]
    else:
        q_pos = query_slots[:, :, None]
    k_pos = torch.arange(total, device=attention_mask.device)[None, None, :]
    visible = (k_pos <= q_pos) & attention_mask[:, None, :].bool()
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
    new_only: bool = False,
) -> tuple[torch.Tensor, list[KV], torch.Tensor | None]:
    """Run the decoder stack.

    inputs_embeds [B,T,D]; attention_mask [B,P+T] (1 = visible); position_ids [B,T]; past: per layer
    (key, value) [B,Hkv,P,Dh] after RoPE. Returns (hidden states after the final norm [B,T,D],
    present K/V [B,Hkv,P+T,Dh] per layer, and the residual stream after block
    `output_hidden_layer` if asked — REPA reads it during training). `attention="math"` spells
    the softmax out in fp32 (what graphs export); "sdpa" uses PyTorch's fused kernels (GPU path).

    With `write_slots` ([T], or [B,T] for per-row columns), `past` holds static buffers [B,Hkv,L,Dh] spanning the whole
    attention_mask [B,L]: row b's new K/V are written into them in place at its slots and attention
    reads the full buffers (later columns hidden causally), so shapes never change between steps.

    With `new_only` (the `llm_decode` graph), the returned K/V are the T new columns only, and
    attention takes the past and the new keys as two blocks of one softmax: past + new is never
    concatenated, so the past is read once per layer and never copied (DESIGN.md: the cache is
    updated in place by the runtime).
    """
    if past is None and (write_slots is not None or new_only):
        raise ValueError("llama_forward: write_slots and new_only read and write the past K/V, but no `past` was given")
    past_kv: list[KV] = past if past is not None else []
    cfg = model.config
    body = model.model
    bsz, num_new, _ = inputs_embeds.shape
    heads = cfg.num_attention_heads
    # HF fills an unset num_key_value_heads with num_attention_heads (plain multi-head attention).
    kv_heads = cfg.num_key_value_heads if cfg.num_key_value_heads is not None else heads
    head_dim = cfg.hidden_size // heads
    dtype = inputs_embeds.dtype
    cos, sin = rope_tables(position_ids, head_dim, rope_theta, dtype)
    if write_slots is not None and write_slots.dim() == 1:
        write_slots = write_slots.expand(bsz, num_new)
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
            columns = write_slots[:, None, :, None].expand(bsz, kv_heads, num_new, head_dim)
            k = past_kv[i][0].scatter_(2, columns, k)
            v = past_kv[i][1].scatter_(2, columns, v)
        elif past is not None and not new_only:
            k = torch.cat([past_kv[i][0], k], dim=2)
            v = torch.cat([past_kv[i][1], v], dim=2)
        present.append((k, v))
        if new_only:
            out = _two_block_attention(q, past_kv[i], (k, v), bias, dtype)
        else:
            out = _attention(q, k, v, bias, dtype, attention)
        out = out.transpose(1, 2).reshape(bsz, num_new, heads * head_dim)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if output_hidden_layer is not None and i + 1 == output_hidden_layer:
            captured = h
    return body.norm(h), present, captured


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype,
               attention: str) -> torch.Tensor:
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    if attention == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = torch.matmul(q, k.transpose(2, 3)) * head_dim**-0.5 + bias
    # Upcast before the softmax (not softmax(dtype=...)): exported, that form becomes an
    # fp16 Softmax followed by a Cast, losing the fp32 island.
    return torch.matmul(F.softmax(scores.float(), dim=-1).to(dtype), v)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B,H,T,X] -> [B,Hkv,(H/Hkv)*T,X]: query head h reads K/V head h // (H/Hkv), as repeat_interleave
    would arrange it, without repeating the K/V."""
    b, h, t, width = x.shape
    return x.reshape(b, kv_heads, (h // kv_heads) * t, width)


def _two_block_attention(q: torch.Tensor, past: KV, new: KV, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax([q.past_k, q.new_k] / sqrt(Dh) + bias) . [past_v; new_v] -> [B,H,T,Dh], in the math
    path's order (matmul, scale, bias, fp32 softmax), computed per block so that no K/V is copied."""
    b, heads, t, head_dim = q.shape
    kv_heads, p = past[0].shape[1], past[0].shape[2]
    qg = _grouped(q, kv_heads)
    scores = torch.cat([torch.matmul(qg, past[0].transpose(2, 3)).reshape(b, heads, t, p),
                        torch.matmul(qg, new[0].transpose(2, 3)).reshape(b, heads, t, t)], dim=-1)
    probs = F.softmax((scores * head_dim**-0.5 + bias).float(), dim=-1).to(dtype)
    out = torch.matmul(_grouped(probs[..., :p], kv_heads), past[1]) + torch.matmul(_grouped(probs[..., p:], kv_heads), new[1])
    return out.reshape(b, heads, t, head_dim)
