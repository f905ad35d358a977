"""The seven graph specs of a model (DESIGN.md "The graph set"), every size from its config.

From the config alone (model-free): the exporter, the build, the runtime's profiles and the tests
all read the same specs. `vae_config` is the VAE's diffusers config (`block_out_channels`,
`scaling_factor`); without it there is no `vae_decoder` graph.
"""

from __future__ import annotations

from typing import Any, Mapping

from .config import JanusFlowConfig
from .graph_contract import GRAPH_NAMES, NEW, PAST, PRESENT, kv_names
from .graph_spec import Dim, GraphSpec, TensorSpec
from .manifest import Limits


def graph_specs(cfg: JanusFlowConfig, latent_size: int, latent_channels: int, vae_config: Mapping[str, Any] | None,
                limits: Limits = Limits()) -> dict[str, GraphSpec]:
    lang, und = cfg.language, cfg.vision_und
    d, v, layers = lang.hidden_size, lang.vocab_size, lang.num_hidden_layers
    kv_heads, head_dim = lang.num_key_value_heads, lang.head_dim
    latent, channels = latent_size, latent_channels
    grid = cfg.image_grid(latent)
    n_img = grid * grid
    width = cfg.gen_enc.channels
    max_seq = min(limits.max_seq, lang.max_position_embeddings)
    # Samples are >= 2 and pairwise distinct so that no dim is specialised at export.
    B = Dim("B", 1, 2, limits.max_batch, 3)
    S = Dim("S", 1, min(128, max_seq), max_seq, 11)
    T = Dim("T", 1, 1 + n_img, 1 + n_img, 5)
    P = Dim("P", 0, min(128, max_seq - 1), max_seq - 1, 7)
    f32, i64 = "float32", "int64"

    def kv(prefix: str, length: str) -> list[TensorSpec]:
        return [TensorSpec(name, f32, ("B", kv_heads, length, head_dim)) for name in kv_names(prefix, layers)]

    int8 = ("fp32", "fp16", "int8")  # graphs with linear layers worth INT8 (export/quantize/int8_build.py)
    llm_extra = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "hidden": d, "vocab": v}
    specs = {
        "vision_encoder": GraphSpec(
            "vision_encoder",
            [TensorSpec("pixel_values", f32, ("B", 3, und.image_size, und.image_size))],
            [TensorSpec("image_embeds", f32, ("B", 1 + und.num_patches, d))],
            {"B": B}, extra={"image_size": und.image_size, "image_tokens": und.num_patches}),
        "embed_tokens": GraphSpec(
            "embed_tokens", [TensorSpec("input_ids", i64, ("B", "S"))], [TensorSpec("inputs_embeds", f32, ("B", "S", d))],
            {"B": B, "S": S}, extra={"vocab": v}),
        "llm_prefill": GraphSpec(
            "llm_prefill",
            [TensorSpec("inputs_embeds", f32, ("B", "S", d)), TensorSpec("attention_mask", i64, ("B", "S")),
             TensorSpec("position_ids", i64, ("B", "S"))],
            [TensorSpec("hidden_states", f32, ("B", "S", d)), TensorSpec("logits", f32, ("B", v)), *kv(PRESENT, "S")],
            {"B": B, "S": S}, precisions=int8, extra=llm_extra),
        "llm_decode": GraphSpec(
            "llm_decode",
            [TensorSpec("inputs_embeds", f32, ("B", "T", d)), TensorSpec("attention_mask", i64, ("B", "P + T")),
             TensorSpec("position_ids", i64, ("B", "T")), *kv(PAST, "P")],
            # Only the new tokens' K/V: the runtime writes them into its cache in place (DESIGN.md).
            [TensorSpec("hidden_states", f32, ("B", "T", d)), TensorSpec("logits", f32, ("B", v)), *kv(NEW, "T")],
            {"B": B, "T": T, "P": P}, precisions=int8, extra=llm_extra),
        "gen_encoder": GraphSpec(
            "gen_encoder",
            [TensorSpec("latents", f32, ("B", channels, latent, latent)), TensorSpec("timesteps", f32, ("B",), keep_dtype=True)],
            [TensorSpec("z_embeds", f32, ("B", n_img, d)), TensorSpec("t_embeds", f32, ("B", d)),
             TensorSpec("skip", f32, ("B", width, grid, grid))],
            {"B": B}, precisions=int8, extra={"latent": latent, "grid": grid}),
        "gen_decoder": GraphSpec(
            "gen_decoder",
            [TensorSpec("hidden_states", f32, ("B", n_img, d)), TensorSpec("skip", f32, ("B", width, grid, grid)),
             TensorSpec("t_embeds", f32, ("B", d))],
            [TensorSpec("velocity", f32, ("B", channels, latent, latent))],
            {"B": B}, precisions=int8),
    }
    if vae_config is not None:
        out = latent * 2 ** (len(vae_config["block_out_channels"]) - 1)
        specs["vae_decoder"] = GraphSpec(
            "vae_decoder",
            [TensorSpec("latents", f32, (("B", channels, latent, latent)))],
            [TensorSpec("images", f32, ("B", 3, out, out))],
            # The SDXL VAE overflows in fp16 (JANUSFLOW.md 6): it is never typed fp16.
            {"B": B}, precisions=("fp32",), extra={"scaling_factor": float(vae_config["scaling_factor"])})
    assert set(specs) <= set(GRAPH_NAMES)
    return specs
