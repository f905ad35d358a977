"""The whole JanusFlow model (without the VAE), with the official attribute names."""

from __future__ import annotations

import torch
from torch import nn

from jfexport.core.config import JanusFlowConfig
from jfexport.core.layout import image_gather_index, splice_image_embeds

from .llama import KV, build_llama, llama_forward
from .norms import RMSNorm
from .siglip import VisionUnderstandingTower
from .uvit import ShallowUViTDecoder, ShallowUViTEncoder


class JanusFlowModel(nn.Module):
    # Set by load_checkpoint: the official tensors the model does not use (attention-pool head),
    # written back on save.
    unused_tensors: dict[str, torch.Tensor]

    def __init__(self, config: JanusFlowConfig):
        super().__init__()
        self.config = config
        lang, und = config.language, config.vision_und
        d = lang.hidden_size
        self.language_model = build_llama(lang)
        self.vision_und_enc_model = VisionUnderstandingTower(und)
        self.vision_und_enc_aligner = nn.Linear(und.width, d)
        self.beg_of_und_embed = nn.Parameter(torch.zeros(1, d))
        self.vision_gen_enc_model = ShallowUViTEncoder(config.gen_enc)
        self.vision_gen_enc_aligner = nn.Linear(config.gen_enc.channels, d)
        self.vision_gen_dec_model = ShallowUViTDecoder(config.gen_dec)
        self.vision_gen_dec_aligner_norm = RMSNorm(d, eps=lang.rms_norm_eps)
        self.vision_gen_dec_aligner = nn.Linear(d, config.gen_dec.in_channels)
        # "math" (explicit fp32 softmax, what graphs export) or "sdpa" (fused kernels, GPU serving).
        self.attention = "math"

    # --- understanding -------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] normalised pixels -> [B,1+N,D]: `beg_of_und_embed`, then the aligned patch features."""
        feats = self.vision_und_enc_aligner(self.vision_und_enc_model(pixel_values))
        boi = self.beg_of_und_embed.to(feats.dtype).expand(feats.shape[0], 1, -1)
        return torch.cat([boi, feats], dim=1)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def prepare_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        images_seq_mask: torch.Tensor,
        images_emb_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Official `prepare_inputs_embeds`: image blocks overwrite the BOI + placeholder positions.

        input_ids [B,T]; pixel_values [B,n,3,S,S]; images_seq_mask [B,T]; images_emb_mask [B,n,1+N].
        """
        return splice_image_embeds(self.embed_tokens(input_ids), self.encode_images(pixel_values.flatten(0, 1)),
                                   image_gather_index(images_seq_mask, images_emb_mask))

    # --- generation ----------------------------------------------------------------------
    def gen_encode(self, latents: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """latents [B,4,h,w], t [B] -> (z_embeds [B,N,D] aligned tokens, t_emb [B,D], skip [B,C,g,g])."""
        x_emb, t_emb = self.vision_gen_enc_model(latents, timesteps)
        return self.align_latent_tokens(x_emb), t_emb, x_emb

    def align_latent_tokens(self, x_emb: torch.Tensor) -> torch.Tensor:
        """Encoder features [B,C,g,g] -> LLM-space tokens [B,g*g,D] (row-major: token = g*row + col)."""
        return self.vision_gen_enc_aligner(x_emb.flatten(2).transpose(1, 2))

    def gen_decode(self, hidden_states: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """LLM output at the image positions [B,N,D] (after the final norm) -> velocity [B,4,h,w]."""
        x = self.vision_gen_dec_aligner(self.vision_gen_dec_aligner_norm(hidden_states))
        b, n, c = x.shape
        g = skip.shape[-1]
        x = x.view(b, g, n // g, c).permute(0, 3, 1, 2)
        return self.vision_gen_dec_model(x, skip, t_emb)

    # --- LLM -----------------------------------------------------------------------------
    def llm(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[KV] | None = None,
        output_hidden_layer: int | None = None,
        write_slots: torch.Tensor | None = None,
        new_only: bool = False,
    ) -> tuple[torch.Tensor, list[KV], torch.Tensor | None]:
        return llama_forward(
            self.language_model, inputs_embeds, attention_mask, position_ids, self.config.language.rope_theta, past,
            output_hidden_layer, self.attention, write_slots, new_only,
        )

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden_states)
