"""The fast torch path of text-to-image under the scheduler: one Euler step of the active rows,
calling the model directly over static buffers, captured as a CUDA graph on CUDA.

`GenerationRows` forms each step from the engines; here the step reads fixed buffers instead
(latents, timesteps, CFG weights and dt of R rows; the prompt K/V of their CFG pairs right-aligned
to a power-of-two width W, left columns masked), so on CUDA it is captured once per (R, W) and
replayed: one launch per step instead of hundreds. Captures live in a bounded LRU. The prompt K/V
are copied into the buffers only when the set of rows changes (rows join and leave between steps,
not within). On CPU the same buffers are used eagerly, which is what the CPU tests compare with
the engine path. Prefill, the VAE and the failure handling are `GenerationRows`' own.

`compile_step` runs the step through `torch.compile` (Inductor fuses the norms, activations and
elementwise tails that eager mode launches one by one); on CUDA the compiled step is then captured
as a graph like the eager one. Each new (R, W) compiles once, which takes seconds to a minute:
it is an option for services that warm their shapes up, measured on and off by `bench-torch`.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch

from ..backends.torch_backend import exact_fp32
from ..engine import Engine
from ..lru import LRU
from .torch_step import capture_or_none, cfg_euler_step
from ..trt_plan import prompt_bucket
from .generation_batch import GenerationRows, _Row

log = logging.getLogger(__name__)


class _StepBuffers:
    """What one Euler step of R rows over prompts of width <= W reads and writes."""

    def __init__(self, rows: int, width: int, tail: int, latent: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        dev = latent.device
        self.z = latent.new_zeros((rows, *latent.shape))
        self.out = torch.zeros_like(self.z)
        self.timesteps = torch.zeros(rows, dtype=torch.float32, device=dev)
        self.cfg = torch.zeros((rows, 1, 1, 1), dtype=torch.float32, device=dev)
        self.dt = torch.zeros((rows, 1, 1, 1), dtype=torch.float32, device=dev)
        self.past = [tuple(t.new_zeros((2 * rows, t.shape[1], width, t.shape[3])) for t in pair) for pair in kv]
        self.mask = torch.zeros((2 * rows, width + tail), dtype=torch.long, device=dev)
        self.positions = torch.zeros((2 * rows, tail), dtype=torch.long, device=dev)
        self.t_emb = None  # `cfg_euler_step` embeds the rows' own timesteps
        self.loaded: list[_Row] = []  # the rows whose prompts are in `past`
        self.graph: torch.cuda.CUDAGraph | None = None

    def load_prompts(self, rows: list[_Row]) -> None:
        if len(rows) == len(self.loaded) and all(a is b for a, b in zip(rows, self.loaded)):
            return
        count, width = len(rows), self.past[0][0].shape[2]
        tail = self.positions.shape[1]
        self.mask.zero_()
        self.mask[:, width:] = 1
        steps = torch.arange(tail, device=self.mask.device)
        for layer, pair in enumerate(self.past):
            for store in pair:
                store.zero_()  # masked columns must hold finite values
        for i, r in enumerate(rows):
            n = r.prompt.length
            for layer, (k, v) in enumerate(self.past):
                pk, pv = r.prompt.past[layer]
                k[i, :, width - n:], k[count + i, :, width - n:] = pk[0], pk[1]
                v[i, :, width - n:], v[count + i, :, width - n:] = pv[0], pv[1]
            for half in (0, 1):
                self.mask[half * count + i, width - n: width] = r.prompt.mask[half]
                self.positions[half * count + i] = n + steps
        self.loaded = list(rows)

    def load_step(self, rows: list[_Row]) -> None:
        self.z.copy_(torch.stack([r.z for r in rows]))
        self.timesteps.copy_(torch.stack([r.schedule.timesteps[r.k] for r in rows]))
        self.cfg.copy_(torch.tensor([r.schedule.cfg for r in rows], dtype=torch.float32).view(-1, 1, 1, 1))
        self.dt.copy_(torch.stack([r.schedule.dt for r in rows]).view(-1, 1, 1, 1))


class FastGenerationRows(GenerationRows):
    def __init__(self, engines: Mapping[str, Engine], pad_id: int, grid: int, max_images: int,
                 observe: Callable[[str, int], None], model, cuda_graphs: bool, compile_step: bool = False):
        super().__init__(engines, pad_id, grid, max_images, observe)
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.compile_step = compile_step
        self._euler_step = torch.compile(cfg_euler_step, dynamic=False) if compile_step else cfg_euler_step
        self._buffers: LRU[tuple[int, int], _StepBuffers] = LRU()

    def _euler(self, rows: list[_Row], cache: bool) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode(), exact_fp32(dtype):
            state = self._state(rows)
            state.load_prompts(rows)
            state.load_step(rows)
            if self.cuda_graphs and state.z.device.type == "cuda" and state.graph is None:
                # The warm-up runs write only `out`, which the replay overwrites.
                state.graph = capture_or_none(lambda: self._compute(state))
                self.cuda_graphs = state.graph is not None
            if state.graph is not None:
                state.graph.replay()
            else:
                self._compute(state)
            return state.out.clone()  # the next step overwrites the buffer

    def _state(self, rows: list[_Row]) -> _StepBuffers:
        width = prompt_bucket(max(r.prompt.length for r in rows), 1 << 30)
        key = (len(rows), width)
        state = self._buffers.get(key)
        if state is None:
            state = _StepBuffers(len(rows), width, 1 + self.grid**2, rows[0].z, rows[0].prompt.past)
            self._buffers.put(key, state)
        return state

    def _compute(self, b: _StepBuffers) -> None:
        try:
            b.out.copy_(self._euler_step(self.model, b))
        except Exception:  # noqa: BLE001 - an error of the eager step itself is raised below
            if self._euler_step is cfg_euler_step:
                raise
            # A compiler that cannot build the step (no Triton, an unsupported op) costs its speed,
            # not the requests: the executor goes on with the eager step.
            log.warning("the compiled Euler step failed; running it eagerly from now on", exc_info=True)
            self._euler_step = cfg_euler_step
            b.out.copy_(cfg_euler_step(self.model, b))
