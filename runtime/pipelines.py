"""`JanusFlowRuntime`: the serving API over a set of engines (any backend).

On CUDA, `from_bundle` runs the fast PyTorch paths (`torch_fast`: prompt K/V once, static K/V
decoding, CUDA-graph steps) instead of going graph by graph through the engine interface.

Thread safety: one runtime may be shared by several threads. Requests are serialised by a lock,
because engines own preallocated buffers (TensorRT bindings, CUDA graphs) that two requests must
not write at once; batch several prompts into one call to use the hardware in parallel.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Mapping

import torch
from PIL import Image

from jfexport.reference.errors import InputError
from jfexport.reference.pipelines.images import initial_noise, to_uint8
from jfexport.reference.schedulers import answers_from_stream, row_generators
from jfexport.reference.processor import JanusProcessor

from .decoder import decode
from .engine import Engine
from .errors import check_finite
from .sampler import sample
from .torch_fast import FastPaths


class JanusFlowRuntime:
    def __init__(self, engines: Mapping[str, Engine], processor: JanusProcessor, latent_shape: tuple[int, int, int], grid: int,
                 max_prompt_len: int | None = None, max_rows: int | None = None, backend: str = "torch"):
        self.engines = engines
        self.processor = processor
        self.latent_shape = latent_shape  # (C, h, w) of one latent
        self.grid = grid
        self.max_prompt_len = max_prompt_len
        self.max_rows = max_rows  # batch rows the engines accept (CFG doubles generation rows)
        self.backend = backend
        self.fast: FastPaths | None = None  # set by from_bundle on CUDA
        self._lock = threading.Lock()

    @classmethod
    def from_engines(cls, folder, backend: str = "auto", precision: str | None = None,
                     device: str | None = None) -> "JanusFlowRuntime":
        """A build folder (`jfexport build`): its manifest, graphs and tokenizer."""
        from pathlib import Path

        from .engines_folder import TOKENIZER_DIR, EnginesError, load_engines

        engines, manifest, chosen = load_engines(folder, backend, precision, device)
        model = manifest["model"]
        und = model["config"]["vision_und_enc_config"]["params"]
        tokenizer_dir = Path(folder) / TOKENIZER_DIR
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise EnginesError(f"{tokenizer_dir}: no tokenizer files in the build folder (rebuild the engines)")
        n_tokens = manifest["graphs"]["vision_encoder"]["spec"]["extra"]["image_tokens"]
        processor = JanusProcessor.from_folder(tokenizer_dir, image_size=int(und.get("image_size", model["image_size"])),
                                               num_image_tokens=n_tokens)
        latent = model["latent_size"]
        return cls(engines, processor, (model["latent_channels"], latent, latent), model["grid"],
                   manifest["limits"]["max_seq"], manifest["limits"]["max_batch"], chosen)

    @classmethod
    def from_bundle(cls, bundle, backend: str = "torch", dtype: torch.dtype = torch.float32, device: str = "cpu",
                    fast: bool | None = None) -> "JanusFlowRuntime":
        """Engines straight from a loaded model (the `torch` backend); `fast` defaults to on for CUDA."""
        if backend != "torch":
            raise InputError(f"from_bundle builds the torch backend only; use from_engines(DIR) for {backend!r}")
        from .backends.torch_backend import torch_engines

        size = bundle.latent_size
        grid = bundle.config.image_grid(size)
        runtime = cls(torch_engines(bundle, dtype, device), bundle.processor, (bundle.latent_channels, size, size), grid,
                      bundle.config.language.max_position_embeddings)
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda if fast is None else fast:
            bundle.model.attention = "sdpa"
            runtime.fast = FastPaths(bundle.model, grid, cuda_graphs=on_cuda)
        return runtime

    def _check_rows(self, rows: int, what: str) -> None:
        if self.max_rows is not None and rows > self.max_rows:
            raise InputError(f"{what} needs {rows} batch rows, the engines were built for at most {self.max_rows}")

    def _check_prompt_len(self, length: int, what: str) -> None:
        if self.max_prompt_len is not None and length > self.max_prompt_len:
            raise InputError(f"{what} is {length} tokens, the engines were built for at most {self.max_prompt_len}")

    def generate_latents(self, prompts: list[str], n: int = 1, steps: int = 30, cfg: float = 2.0, seed: int = 0,
                         on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        batch = self.processor.generation_tokens([p for p in prompts for _ in range(n)])
        self._check_rows(2 * batch.input_ids.shape[0], f"{len(prompts)} prompt(s) x {n} image(s) with CFG")
        self._check_prompt_len(batch.input_ids.shape[1] - 1 + 1 + self.grid**2, "prompt + image sequence")
        z0 = initial_noise((len(prompts) * n, *self.latent_shape), seed, torch.float32)
        pad_id = self.processor.tokenizer.pad_id
        with self._lock:
            if self.fast is None:
                return sample(self.engines, batch.input_ids, batch.attention_mask, z0, steps, cfg, pad_id, self.grid, on_step)
            z = self.fast.sampler.sample(batch.input_ids, batch.attention_mask, z0.to(self.fast.device), steps, cfg,
                                         pad_id, on_step)
        check_finite("generation", "latents", z)
        return z

    def decode_images(self, latents: torch.Tensor) -> list[Image.Image]:
        with self._lock:
            images = self.engines["vae_decoder"].run({"latents": latents})["images"]
        check_finite("vae_decoder", "images", images)
        return [Image.fromarray(x.cpu().numpy()) for x in to_uint8(images)]

    def generate(self, prompts: list[str], **kwargs) -> list[Image.Image]:
        """`n` images per prompt, in prompt order; deterministic for a fixed seed and backend."""
        return self.decode_images(self.generate_latents(prompts, **kwargs))

    def chat_stream(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 512,
                    temperature: float = 0.0, top_p: float = 0.95, seed: int = 0,
                    on_logits: Callable[[torch.Tensor], None] | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token [B] of every (image, question) row; the lock is held while streaming."""
        batch = self.processor.understanding_batch(questions, images)
        self._check_rows(batch.input_ids.shape[0], f"{len(questions)} question(s)")
        self._check_prompt_len(batch.input_ids.shape[1] + max_new_tokens, "question + answer")
        gen = row_generators(seed, batch.input_ids.shape[0])
        eos = self.processor.tokenizer.eos_id
        with self._lock:
            if self.fast is not None:
                embeds = self.fast.embeds(batch)
                yield from self.fast.decoder.decode(embeds, batch.attention_mask, max_new_tokens, eos, temperature, top_p,
                                                    gen, on_logits)
                return
            yield from decode(self.engines, batch.input_ids, batch.attention_mask, batch.pixel_values,
                              batch.images_seq_mask, batch.images_emb_mask, max_new_tokens,
                              eos, temperature, top_p, gen, on_logits)

    def chat(self, images: list[Image.Image], questions: list[str], **kwargs) -> list[str]:
        return answers_from_stream(self.chat_stream(images, questions, **kwargs), len(questions), self.processor.tokenizer)

