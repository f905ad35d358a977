"""The names of the export/runtime contract (DESIGN.md "The graph set"), free of model code.

The exporter, the engines, the K/V cache and the serving scheduler all name graphs and K/V
tensors through this module, so a rename cannot leave one side behind.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

GRAPH_NAMES = ("vision_encoder", "embed_tokens", "llm_prefill", "llm_decode", "gen_encoder", "gen_decoder", "vae_decoder")
# What each task runs: a build serves chat without its VAE and images without its vision encoder.
GENERATION_GRAPHS = ("embed_tokens", "llm_prefill", "llm_decode", "gen_encoder", "gen_decoder", "vae_decoder")
UNDERSTANDING_GRAPHS = ("vision_encoder", "embed_tokens", "llm_prefill", "llm_decode")

LLM_INPUTS = ("inputs_embeds", "attention_mask", "position_ids")
LLM_OUTPUTS = ("hidden_states", "logits")

T = TypeVar("T")


def kv_name(prefix: str, layer: int, part: str) -> str:
    """`past.3.key`, `present.0.value`: prefix is "past" (inputs) or "present" (outputs)."""
    return f"{prefix}.{layer}.{part}"


def kv_names(prefix: str, layers: int) -> tuple[str, ...]:
    """Every layer's key then value, in graph I/O order."""
    return tuple(kv_name(prefix, i, part) for i in range(layers) for part in ("key", "value"))


def present_as_past(outputs: Mapping[str, T]) -> dict[str, T]:
    """An LLM graph's `present.*` outputs renamed as the `past.*` inputs of the next call."""
    return {"past" + k[len("present"):]: v for k, v in outputs.items() if k.startswith("present.")}


def count_layers(outputs: Mapping[str, object]) -> int:
    return sum(1 for k in outputs if k.startswith("present.") and k.endswith(".key"))
