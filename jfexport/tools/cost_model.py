"""Analytic FLOP and byte counts of each stage, from the model config alone.

Used by the benchmarks to print a physical floor next to measured times: compute-bound stages
cannot beat FLOPs / matmul rate, memory-bound ones (decode) cannot beat bytes / bandwidth.
Only matrix products are counted (2 FLOPs per multiply-add); norms and activations are noise.
"""

from __future__ import annotations

from dataclasses import dataclass

from jfexport.core.config import JanusFlowConfig


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float  # weights read once + K/V read, at `bytes_per_elem`

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def scaled(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.bytes * k)


def _llm_params(cfg: JanusFlowConfig) -> tuple[int, int]:
    """(parameters inside the decoder blocks, lm_head parameters)."""
    lang = cfg.language
    d, f, kv = lang.hidden_size, lang.intermediate_size, lang.num_key_value_heads * lang.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    return per_layer * lang.num_hidden_layers, d * lang.vocab_size


def llm_cost(cfg: JanusFlowConfig, batch: int, new: int, past: int, bytes_per_elem: int, with_logits: bool) -> Cost:
    """One LLM call over `new` tokens with `past` cached ones, for `batch` rows."""
    lang = cfg.language
    blocks, head = _llm_params(cfg)
    tokens = batch * new
    attn = 2 * 2 * batch * lang.num_hidden_layers * lang.num_attention_heads * lang.head_dim * new * (past + new)
    flops = 2 * tokens * blocks + attn + (2 * batch * head if with_logits else 0)
    kv_bytes = 2 * batch * lang.num_hidden_layers * lang.num_key_value_heads * lang.head_dim * (past + new) * bytes_per_elem
    return Cost(flops, (blocks + (head if with_logits else 0)) * bytes_per_elem + kv_bytes)


def _convnext_cost(channels: int, cond: int, positions: int, rows: int) -> float:
    hidden = 4 * channels
    per_pos = 2 * (channels * 49 + channels * hidden * 2)
    return rows * (positions * per_pos + 2 * cond * 2 * channels)


def gen_encoder_cost(cfg: JanusFlowConfig, rows: int, latent: int, bytes_per_elem: int) -> Cost:
    enc = cfg.gen_enc
    grid = latent // enc.stride
    n = grid * grid
    conv = rows * n * 2 * enc.input_channels * enc.kernel_size**2 * enc.channels
    time_mlp = rows * 2 * (enc.channels * enc.hidden_size + enc.hidden_size**2)
    blocks = enc.layers_in_middle * _convnext_cost(enc.channels, enc.hidden_size, n, rows) if enc.use_mid_block else 0
    aligner = rows * n * 2 * enc.channels * cfg.language.hidden_size
    params = (enc.channels * (enc.input_channels * enc.kernel_size**2 + cfg.language.hidden_size)
              + enc.hidden_size * (enc.channels + enc.hidden_size))
    params += enc.layers_in_middle * (enc.channels * 49 + 8 * enc.channels**2 + 2 * enc.channels * enc.hidden_size)
    return Cost(conv + time_mlp + blocks + aligner, params * bytes_per_elem)


def gen_decoder_cost(cfg: JanusFlowConfig, rows: int, latent: int, bytes_per_elem: int) -> Cost:
    dec = cfg.gen_dec
    grid = latent // cfg.gen_enc.stride
    n = grid * grid
    width = dec.in_channels + dec.channels
    aligner = rows * n * 2 * cfg.language.hidden_size * dec.in_channels
    blocks = dec.layers_in_middle * _convnext_cost(width, dec.hidden_size, n, rows) if dec.use_mid_block else 0
    out = rows * n * 2 * width * dec.out_channels * 4
    params = (cfg.language.hidden_size * dec.in_channels
              + dec.layers_in_middle * (width * 49 + 8 * width**2 + 2 * width * dec.hidden_size))
    return Cost(aligner + blocks + out, params * bytes_per_elem)


def vision_cost(cfg: JanusFlowConfig, rows: int, bytes_per_elem: int) -> Cost:
    und = cfg.vision_und
    n, w = und.num_patches, und.width
    patch = rows * n * 2 * 3 * und.patch_size**2 * w
    per_block = rows * (n * 2 * (4 * w * w + 2 * w * und.mlp_dim) + 2 * 2 * n * n * w)
    aligner = rows * n * 2 * w * cfg.language.hidden_size
    params = und.num_blocks * (4 * w * w + 2 * w * und.mlp_dim) + w * cfg.language.hidden_size
    return Cost(patch + und.num_blocks * per_block + aligner, params * bytes_per_elem)


def generation_cost(cfg: JanusFlowConfig, images: int, prompt_len: int, steps: int, latent: int, bytes_per_elem: int,
                    recompute: bool) -> dict[str, Cost]:
    """Per-stage cost of one text-to-image call (CFG doubles the LLM/decoder rows).

    `recompute` models the official demo, which re-runs the whole prompt every step.
    """
    rows = 2 * images
    tail = 1 + (latent // cfg.gen_enc.stride) ** 2
    prompt = llm_cost(cfg, rows, prompt_len, 0, bytes_per_elem, with_logits=False)
    if recompute:
        step_llm = llm_cost(cfg, rows, prompt_len + tail, 0, bytes_per_elem, with_logits=False)
        prompt = Cost(0, 0)
    else:
        step_llm = llm_cost(cfg, rows, tail, prompt_len, bytes_per_elem, with_logits=False)
    return {
        "llm_prefill": prompt,
        "gen_encoder": gen_encoder_cost(cfg, images if not recompute else rows, latent, bytes_per_elem).scaled(steps),
        "llm_decode": step_llm.scaled(steps),
        "gen_decoder": gen_decoder_cost(cfg, rows, latent, bytes_per_elem).scaled(steps),
    }


def floor_ms(cost: Cost, flops_per_s: float, bytes_per_s: float) -> float:
    """Lower bound on wall time: the slower of compute and memory traffic."""
    return max(cost.flops / flops_per_s, cost.bytes / bytes_per_s) * 1e3
