"""User-level reference pipelines: prompts and images in, PIL images and text out.

`ReferencePipeline` is the PyTorch ground truth the runtime is checked against; it follows the
official procedure (JANUSFLOW.md 4-5) with the batching rules of `layout`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Literal

import torch
from PIL import Image

from jfexport import defaults
from jfexport.core.errors import InputError
from jfexport.core.images import initial_noise, to_uint8
from jfexport.core.processor.request_checks import check_generation, check_sampling
from jfexport.core.schedulers import answers_from_stream, row_generators

from ..bundle import ModelBundle
from .generation import Schedule, decode_latents, sample_latents
from .understanding import decode_tokens

Numerics = Literal["fp32", "bf16"]


class ReferencePipeline:
    def __init__(self, bundle: ModelBundle, numerics: Numerics = "fp32"):
        bundle.require_processor()
        self.bundle = bundle
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[numerics]
        self.model = bundle.model.to(self.dtype)
        if bundle.vae is not None and bundle.vae.dtype != self.dtype:
            # The official pipeline decodes with the bf16 VAE; fp32 is the parity default.
            bundle.vae.to(self.dtype)

    @property
    def processor(self):
        return self.bundle.processor

    @property
    def image_size(self) -> int:
        """Side of the images `generate` returns, as `JanusFlowRuntime.image_size`."""
        return self.bundle.image_size

    def generate_latents(
        self,
        prompts: list[str],
        n: int = defaults.IMAGES_PER_PROMPT,
        steps: int = defaults.STEPS,
        cfg: float = defaults.CFG,
        seed: int = defaults.SEED,
        schedule: Schedule = "cached",
        on_step: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        n, steps, cfg, seed, _ = check_generation(n, steps, cfg, seed)
        if not prompts:
            raise InputError("no prompt given")
        batch = self.processor.generation_tokens([p for p in prompts for _ in range(n)])
        shape = (len(prompts) * n, self.bundle.latent_channels, self.bundle.latent_size, self.bundle.latent_size)
        z0 = initial_noise(shape, seed, self.dtype)
        return sample_latents(
            self.model, batch.input_ids, batch.attention_mask, z0, steps, cfg, self.processor.tokenizer.pad_id,
            schedule=schedule, on_step=on_step,
        )

    def generate(self, prompts: list[str], **kwargs) -> list[Image.Image]:
        """Text-to-image: `n` images per prompt, in prompt order."""
        latents = self.generate_latents(prompts, **kwargs)
        images = to_uint8(decode_latents(self.bundle.vae, latents))
        return [Image.fromarray(img.numpy()) for img in images]

    def chat_stream(
        self,
        images: list[Image.Image],
        questions: list[str],
        max_new_tokens: int = defaults.MAX_NEW_TOKENS,
        temperature: float = defaults.TEMPERATURE,
        top_p: float = defaults.TOP_P,
        seed: int = defaults.SEED,
        on_logits: Callable[[torch.Tensor], None] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token id of every (image, question) row until all rows end."""
        temperature, top_p, seed, max_new_tokens = check_sampling(temperature, top_p, seed, max_new_tokens)
        if len(images) != len(questions):
            raise InputError(f"{len(images)} images for {len(questions)} questions")
        batch = self.processor.understanding_batch(questions, images)
        embeds = self.model.prepare_inputs_embeds(
            batch.input_ids, batch.pixel_values.to(self.dtype), batch.images_seq_mask, batch.images_emb_mask
        )
        yield from decode_tokens(
            self.model, embeds, batch.attention_mask, max_new_tokens, self.processor.tokenizer.eos_id,
            temperature, top_p, row_generators(seed, len(questions)), on_logits,
        )

    def chat(self, images: list[Image.Image], questions: list[str], **kwargs) -> list[str]:
        return answers_from_stream(self.chat_stream(images, questions, **kwargs), len(questions), self.processor.tokenizer)
