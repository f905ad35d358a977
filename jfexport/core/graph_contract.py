"""The names of the export/runtime contract (DESIGN.md "The graph set"), free of model code.

The exporter, the engines, the K/V cache and the serving scheduler all name graphs and K/V
tensors through this module, so a rename cannot leave one side behind.
"""

from __future__ import annotations

from typing import Mapping

GRAPH_NAMES = ("vision_encoder", "embed_tokens", "llm_prefill", "llm_decode", "gen_encoder", "gen_decoder", "vae_decoder")
# What each task runs: a build serves chat without its VAE and images without its vision encoder.
GENERATION_GRAPHS = ("embed_tokens", "llm_prefill", "llm_decode", "gen_encoder", "gen_decoder", "vae_decoder")
UNDERSTANDING_GRAPHS = ("vision_encoder", "embed_tokens", "llm_prefill", "llm_decode")

LLM_INPUTS = ("inputs_embeds", "attention_mask", "position_ids")
LLM_OUTPUTS = ("hidden_states", "logits")

# K/V tensor prefixes. `llm_prefill` outputs the prompt's K/V as PRESENT; `llm_decode` reads the cache
# as PAST and outputs only the K/V of its own new tokens as NEW (the runtime writes them into the
# cache in place: no graph returns past + new).
PAST, PRESENT, NEW = "past", "present", "new"


def kv_name(prefix: str, layer: int, part: str) -> str:
    """`past.3.key`, `new.0.value`: prefix is one of PAST (inputs), PRESENT or NEW (outputs)."""
    return f"{prefix}.{layer}.{part}"


def kv_names(prefix: str, layers: int) -> tuple[str, ...]:
    """Every layer's key then value, in graph I/O order."""
    return tuple(kv_name(prefix, i, part) for i in range(layers) for part in ("key", "value"))


def count_layers(tensors: Mapping[str, object], prefix: str = PRESENT) -> int:
    return sum(1 for k in tensors if k.startswith(prefix + ".") and k.endswith(".key"))
