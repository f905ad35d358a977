"""The seven graphs of the export/runtime contract as nn.Modules over the reference model.

Each module takes the graph's inputs positionally in contract order and returns its outputs in
contract order (DESIGN.md "The graph set"). The exporter traces these modules and the runtime's
torch backend runs them, so an ONNX graph and its PyTorch counterpart cannot drift apart.
"""

from __future__ import annotations

import torch
from torch import nn

from jfexport.core.graph_contract import GRAPH_NAMES, LLM_INPUTS, LLM_OUTPUTS, NEW, PAST, PRESENT, kv_names

from .modules.janusflow import JanusFlowModel

# State-dict prefixes (of JanusFlowModel, or of the VAE for vae_decoder) of the weights each graph
# computes with: a rebuild compares their hashes to re-export only graphs whose weights changed.
GRAPH_WEIGHTS: dict[str, tuple[str, ...]] = {
    "vision_encoder": ("vision_und_enc_model.", "vision_und_enc_aligner.", "beg_of_und_embed"),
    "embed_tokens": ("language_model.model.embed_tokens.",),
    "llm_prefill": ("language_model.model.layers.", "language_model.model.norm.", "language_model.lm_head."),
    "llm_decode": ("language_model.model.layers.", "language_model.model.norm.", "language_model.lm_head."),
    "gen_encoder": ("vision_gen_enc_model.", "vision_gen_enc_aligner."),
    "gen_decoder": ("vision_gen_dec_model.", "vision_gen_dec_aligner_norm.", "vision_gen_dec_aligner."),
    "vae_decoder": ("decoder.", "post_quant_conv."),
}


def graph_weights(name: str, model: JanusFlowModel, vae=None) -> dict[str, torch.Tensor]:
    source = vae if name == "vae_decoder" else model
    return {k: v for k, v in source.state_dict().items() if k.startswith(GRAPH_WEIGHTS[name])}


class VisionEncoderGraph(nn.Module):
    """pixel_values [B,3,H,W] -> image_embeds [B,1+N,D]."""

    input_names: tuple[str, ...] = ("pixel_values",)
    output_names: tuple[str, ...] = ("image_embeds",)

    def __init__(self, model: JanusFlowModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.encode_images(pixel_values),)


class EmbedTokensGraph(nn.Module):
    """input_ids [B,S] -> inputs_embeds [B,S,D]."""

    input_names: tuple[str, ...] = ("input_ids",)
    output_names: tuple[str, ...] = ("inputs_embeds",)

    def __init__(self, model: JanusFlowModel):
        super().__init__()
        self.embed = model.language_model.model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.embed(input_ids),)


def build_graph(name: str, model: JanusFlowModel, vae=None) -> nn.Module:
    """The module of graph `name` (one of GRAPH_NAMES)."""
    if name == "vae_decoder":
        if vae is None:
            raise ValueError("the vae_decoder graph needs a VAE")
        return VAEDecoderGraph(vae).eval()
    factories = {
        "vision_encoder": lambda: VisionEncoderGraph(model),
        "embed_tokens": lambda: EmbedTokensGraph(model),
        "llm_prefill": lambda: LLMGraph(model, with_past=False),
        "llm_decode": lambda: LLMGraph(model, with_past=True),
        "gen_encoder": lambda: GenEncoderGraph(model),
        "gen_decoder": lambda: GenDecoderGraph(model),
    }
    if name not in factories:
        raise ValueError(f"unknown graph {name!r} (known: {', '.join(GRAPH_NAMES)})")
    return factories[name]().eval()


class LLMGraph(nn.Module):
    """Prefill (no past) or decode (flat past K/V after the three fixed inputs).

    -> hidden_states [B,T,D] after the final norm, logits [B,V] of the last position only, then
    per layer key and value: prefill's `present.*` (the prompt's K/V), decode's `new.*` (the K/V of
    its T new tokens only: the runtime writes them into its cache, which it feeds back as `past.*`).
    """

    def __init__(self, model: JanusFlowModel, with_past: bool):
        super().__init__()
        self.model = model
        self.with_past = with_past
        layers = model.config.language.num_hidden_layers
        self.input_names = LLM_INPUTS + (kv_names(PAST, layers) if with_past else ())
        self.output_names = LLM_OUTPUTS + kv_names(NEW if with_past else PRESENT, layers)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past_flat: torch.Tensor):
        past = list(zip(past_flat[0::2], past_flat[1::2])) if self.with_past else None
        hidden, kv, _ = self.model.llm(inputs_embeds, attention_mask, position_ids, past, new_only=self.with_past)
        logits = self.model.logits(hidden[:, -1])
        return (hidden, logits, *[t for pair in kv for t in pair])


class GenEncoderGraph(nn.Module):
    """latents [B,C,h,w], timesteps [B] -> z_embeds [B,N,D], t_embeds [B,D], skip [B,C',g,g]."""

    input_names: tuple[str, ...] = ("latents", "timesteps")
    output_names: tuple[str, ...] = ("z_embeds", "t_embeds", "skip")

    def __init__(self, model: JanusFlowModel):
        super().__init__()
        self.model = model

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.gen_encode(latents, timesteps)


class GenDecoderGraph(nn.Module):
    """hidden_states [B,N,D], skip, t_embeds -> velocity [B,C,h,w]."""

    input_names: tuple[str, ...] = ("hidden_states", "skip", "t_embeds")
    output_names: tuple[str, ...] = ("velocity",)

    def __init__(self, model: JanusFlowModel):
        super().__init__()
        self.model = model

    def forward(self, hidden_states: torch.Tensor, skip: torch.Tensor, t_embeds: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.gen_decode(hidden_states, skip, t_embeds),)


class VAEDecoderGraph(nn.Module):
    """Raw latents [B,C,h,w] -> images [B,3,H,W] in [-1,1]; the scaling factor is applied inside."""

    input_names: tuple[str, ...] = ("latents",)
    output_names: tuple[str, ...] = ("images",)

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.decode(latents / self.scaling_factor).sample.clamp(-1.0, 1.0),)
