"""The torch executor of the generation step: the model called directly over static buffers,
captured as a CUDA graph on CUDA (chosen by `JanusFlowRuntime.from_bundle(fast=...)`; serving
from an engines folder never imports this module, which calls model code).

The step (`generation_step.cfg_euler_step`) reads fixed buffers of R rows whose prompt K/V are
right-aligned to a power-of-two width W, so on CUDA it is captured once per (R, W) and replayed:
one launch per step instead of hundreds. The buffers and their captures live in a bounded LRU.
On CPU the same buffers are used eagerly, which is what the CPU tests compare with the engine
executor.

`compile_step` runs the step through `torch.compile` (Inductor fuses the norms, activations and
elementwise tails that eager mode launches one by one); on CUDA the compiled step is then captured
as a graph like the eager one. Each new (R, W) compiles once, which takes seconds to a minute:
it is an option for services that warm their shapes up, measured on and off by `bench-torch`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..backends.torch_backend import exact_fp32
from ..lru import LRU
from .generation_step import KV, PromptKV, StepBuffers, cfg_euler_step
from .torch_step import capture_or_none, prompt_bucket

if TYPE_CHECKING:
    from jfexport.reference.modules.janusflow import JanusFlowModel

log = logging.getLogger(__name__)


class TorchGenerationExecutor:
    def __init__(self, model: "JanusFlowModel", grid: int, cuda_graphs: bool, compile_step: bool = False):
        self.model = model
        self.tail = 1 + grid**2
        self.cuda_graphs = cuda_graphs
        self.compile_step = compile_step
        self._step = torch.compile(cfg_euler_step, dynamic=False) if compile_step else cfg_euler_step
        self._buffers: LRU[tuple[int, int], StepBuffers] = LRU()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- the model's work --------------------------------------------------------------------------

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> KV:
        model = self.model
        device = next(model.parameters()).device
        with torch.inference_mode(), exact_fp32(self.dtype):
            return model.llm(model.embed_tokens(ids.to(device)), mask.to(device), positions.to(device))[1]

    def encode(self, z: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model, dtype = self.model, self.dtype
        # The timesteps are rounded to the model's dtype first, as the engines' gen_encoder input
        # is (and the official loop's bf16 t).
        t_emb = model.vision_gen_enc_model.time_embedding(timesteps.to(dtype), dtype)
        skip = model.vision_gen_enc_model.features(z.to(dtype), t_emb)
        return t_emb, model.align_latent_tokens(skip), skip

    def hidden(self, step_embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: KV) -> torch.Tensor:
        return self.model.llm(step_embeds, mask, positions, past)[0]

    def velocity(self, hidden: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return self.model.gen_decode(hidden, skip, t_emb)

    # -- buffers and launches ----------------------------------------------------------------------

    def width(self, prompts: list[PromptKV]) -> int:
        """The buffers' prompt width: similar lengths share one shape, hence one capture."""
        return prompt_bucket(max(p.length for p in prompts), 1 << 30)

    def new_buffers(self, prompts: list[PromptKV], latent: torch.Tensor) -> StepBuffers:
        return StepBuffers(len(prompts), self.width(prompts), self.tail, latent, prompts[0].past)

    def buffers(self, prompts: list[PromptKV], latent: torch.Tensor) -> StepBuffers:
        key = (len(prompts), self.width(prompts))
        b = self._buffers.get(key)
        if b is None:
            b = self.new_buffers(prompts, latent)
            self._buffers.put(key, b)
        return b

    def run(self, b: StepBuffers) -> torch.Tensor:
        with exact_fp32(self.dtype):
            self.launch(b)
        return b.out.clone()  # the next step overwrites the buffer

    def launch(self, b: StepBuffers) -> None:
        """The step over `b` into `b.out`: replayed where captured, captured first on CUDA."""
        if self.cuda_graphs and b.z.device.type == "cuda" and b.graph is None:
            # The warm-up runs write only `out`, which the replay overwrites.
            b.graph = capture_or_none(lambda: self.compute(b))
            self.cuda_graphs = b.graph is not None
        if b.graph is not None:
            b.graph.replay()
        else:
            self.compute(b)

    def compute(self, b: StepBuffers) -> None:
        """The step over `b` into `b.out`, compiled where asked (eager if the compiler fails)."""
        try:
            b.out.copy_(self._step(self, b))
        except Exception:  # noqa: BLE001 - an error of the eager step itself is raised below
            if self._step is cfg_euler_step:
                raise
            # A compiler that cannot build the step (no Triton, an unsupported op) costs its speed,
            # not the requests: the executor goes on with the eager step.
            log.warning("the compiled Euler step failed; running it eagerly from now on", exc_info=True)
            self._step = cfg_euler_step
            b.out.copy_(cfg_euler_step(self, b))
