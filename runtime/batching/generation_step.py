"""The text-to-image step, written once: one CFG Euler step of R rows over their prompts' K/V,
against an executor that runs the model's three stages (DESIGN.md "Serving").

Step: `gen_encoder` on the R latents and their own timesteps -> the LLM over [t_emb, z_embeds]
of the 2R CFG rows (the R conditional rows, then the R unconditional ones, as the reference loop
lays them out) with each row's prompt K/V as past (the step tokens never enter the cache, so a
row's past never changes) -> `gen_decoder` -> CFG combine -> Euler. The ODE state stays fp32
whatever the executor's precision.

`StepBuffers` is what one step reads and writes: latents, timesteps, CFG weights and dt of the R
rows, and the prompt K/V of their CFG pairs right-aligned to a width W with the left columns
masked and each row's own positions (prompts of different lengths side by side). The prompt
columns are loaded only when the rows' prompts change (rows join and leave between steps, not
within). Executors decide where the buffers live and how wide they are: the engine executor
(here: the graph contract's names, any backend) keeps one set at the exact width; the torch
executor (`torch_generation`, the model called directly) keeps a set per (R, bucketed W) so
that each shape is captured once as a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import torch

from jfexport.core.graph_contract import PAST, PRESENT, count_layers, kv_name
from jfexport.core.schedulers import cfg_velocity, euler_step

from ..engine import Engine

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(eq=False)  # identity: buffers reload when the prompts they hold are other objects
class PromptKV:
    """One prompt's CFG pair after prefill, from its BOS on: K/V [2,Hkv,P,Dh] per layer (cond,
    uncond) and mask [2,P]."""

    past: KV
    mask: torch.Tensor

    @property
    def length(self) -> int:
        return self.mask.shape[1]


class StepBuffers:
    """What one Euler step of R rows over prompts of width <= W reads (`z`, `timesteps`, `cfg`, `dt`,
    `past`, `mask`, `positions`) and where an executor may write the next latents (`out`)."""

    def __init__(self, rows: int, width: int, tail: int, latent: torch.Tensor, kv: KV):
        dev = latent.device
        self.z = latent.new_zeros((rows, *latent.shape))
        self.out = torch.zeros_like(self.z)
        self.timesteps = torch.zeros(rows, dtype=torch.float32, device=dev)
        self.cfg = torch.zeros((rows, 1, 1, 1), dtype=torch.float32, device=dev)
        self.dt = torch.zeros((rows, 1, 1, 1), dtype=torch.float32, device=dev)
        self.past: KV = [(k.new_zeros((2 * rows, k.shape[1], width, k.shape[3])),
                          v.new_zeros((2 * rows, v.shape[1], width, v.shape[3]))) for k, v in kv]
        self.mask = torch.zeros((2 * rows, width + tail), dtype=torch.long, device=dev)
        self.positions = torch.zeros((2 * rows, tail), dtype=torch.long, device=dev)
        self.loaded: list[PromptKV] = []  # the prompts whose columns are in `past`, row by row
        self.graph: torch.cuda.CUDAGraph | None = None  # the executor's capture over these buffers
        # The last step's guided velocity [R,C,h,w] (the step's own tensor, valid until the next
        # step: a captured step refills it on replay), which previews read.
        self.velocity: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.z.shape[0]

    @property
    def width(self) -> int:
        return self.past[0][0].shape[2]

    def load_prompts(self, prompts: list[PromptKV]) -> None:
        if len(prompts) == len(self.loaded) and all(a is b for a, b in zip(prompts, self.loaded)):
            return
        self.loaded = []  # a load that raises half-way must not be taken for a complete one
        count, width, tail = len(prompts), self.width, self.positions.shape[1]
        self.mask.zero_()
        self.mask[:, width:] = 1
        steps = torch.arange(tail, device=self.mask.device)
        for k, v in self.past:
            k.zero_()  # masked columns must hold finite values
            v.zero_()
        for i, p in enumerate(prompts):
            n = p.length
            for (k, v), (pk, pv) in zip(self.past, p.past):
                k[i, :, width - n:], k[count + i, :, width - n:] = pk[0], pk[1]
                v[i, :, width - n:], v[count + i, :, width - n:] = pv[0], pv[1]
            for half in (0, 1):
                self.mask[half * count + i, width - n: width] = p.mask[half]
                self.positions[half * count + i] = n + steps
        self.loaded = list(prompts)

    def load_step(self, z: torch.Tensor, timesteps: torch.Tensor, cfg: torch.Tensor, dt: torch.Tensor) -> None:
        """This step's latents [R,C,h,w], model timesteps [R], CFG weights and dt [R,1,1,1]."""
        self.z.copy_(z)
        self.timesteps.copy_(timesteps)
        self.cfg.copy_(cfg)
        self.dt.copy_(dt)


class GenerationExecutor(Protocol):
    """The model work of text-to-image: the prompts' prefill, the three stages of one step, and
    how a step over buffers is launched."""

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> KV:
        """The prompt K/V [B,Hkv,P,Dh] per layer of token rows [B,P] (on the executor's device)."""

    def encode(self, z: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t_emb [R,D], aligned z_embeds [R,N,D], skip [R,C',h/2,w/2]) of latents [R,C,h,w] fp32."""

    def hidden(self, step_embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: KV) -> torch.Tensor:
        """The LLM's final hidden states [2R,1+N,D] of the step tokens over the prompts' past."""

    def velocity(self, hidden: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """The raw velocity [2R,C,h,w] of both CFG halves from the image positions' hidden states."""

    def buffers(self, prompts: list[PromptKV], latent: torch.Tensor) -> StepBuffers:
        """Buffers for a step of these rows (loaded by the caller); `latent` is one row's [C,h,w]."""

    def run(self, b: StepBuffers) -> torch.Tensor:
        """The next latents [R,C,h,w] after `cfg_euler_step(self, b)`, launched as the executor does."""


def step_inputs(ex: GenerationExecutor, b: StepBuffers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t_emb, step token embeddings [t_emb, z_embeds], skip) of both CFG halves: the encoder runs
    once on the R latents, since both halves see the same z."""
    t_emb, z_embeds, skip = ex.encode(b.z, b.timesteps)
    t_emb = t_emb.repeat(2, 1)
    return t_emb, torch.cat([t_emb[:, None, :], z_embeds.repeat(2, 1, 1)], dim=1), skip.repeat(2, 1, 1, 1)


def step_velocity(ex: GenerationExecutor, hidden: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    """The decoder reads the image positions only (after the t_emb token); the update is fp32."""
    return ex.velocity(hidden[:, 1:], skip, t_emb).float()


def guided_euler(b: StepBuffers, v_raw: torch.Tensor) -> torch.Tensor:
    """CFG with each row's weight, then the Euler update with each row's dt.

    `v`, the guided velocity of every row, is kept as `b.velocity` (a reference, no copy): the rows
    that want a preview at this step compute their clean-latent estimate from it afterwards, so
    rows that want none pay nothing, and a captured or compiled step keeps the same arithmetic."""
    rows = b.z.shape[0]
    v = cfg_velocity(v_raw[:rows], v_raw[rows:], b.cfg)
    b.velocity = v
    return euler_step(b.z, v, b.dt)


def cfg_euler_step(ex: GenerationExecutor, b: StepBuffers) -> torch.Tensor:
    """The next latents of one CFG Euler step over `b`, as one function so that an executor can
    capture it as a CUDA graph or compile it whole."""
    t_emb, embeds, skip = step_inputs(ex, b)
    hidden = ex.hidden(embeds, b.mask, b.positions, b.past)
    return guided_euler(b, step_velocity(ex, hidden, skip, t_emb))


def advance(ex: GenerationExecutor, prompts: list[PromptKV], z: torch.Tensor, timesteps: torch.Tensor,
            cfg: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of R rows (row i over `prompts[i]`): their next latents [R,C,h,w], and the guided
    velocity of the step (the executor's tensor: read it before the next step)."""
    with torch.inference_mode():
        b = ex.buffers(prompts, z[0])
        b.load_prompts(prompts)
        b.load_step(z, timesteps, cfg, dt)
        z_next = ex.run(b)
        if b.velocity is None:
            raise RuntimeError("the step ran without keeping its guided velocity")
        return z_next, b.velocity


class EngineGenerationExecutor:
    """Text-to-image through the engines of the graph contract (`embed_tokens`, `llm_prefill`,
    `gen_encoder`, `llm_decode`, `gen_decoder`), any backend: dynamic shapes, so the buffers have
    the rows' exact width."""

    def __init__(self, engines: Mapping[str, Engine], grid: int):
        self.engines = engines
        self.tail = 1 + grid**2  # the step tokens: t_emb and the image tokens
        self._buffers: StepBuffers | None = None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> KV:
        embeds = self.engines["embed_tokens"].run({"input_ids": ids})["inputs_embeds"]
        device = embeds.device
        out = self.engines["llm_prefill"].run({"inputs_embeds": embeds, "attention_mask": mask.to(device),
                                               "position_ids": positions.to(device)})
        return [(out[kv_name(PRESENT, i, "key")], out[kv_name(PRESENT, i, "value")]) for i in range(count_layers(out))]

    def encode(self, z: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.engines["gen_encoder"].run({"latents": z, "timesteps": timesteps})
        return out["t_embeds"], out["z_embeds"], out["skip"]

    def hidden(self, step_embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: KV) -> torch.Tensor:
        feeds = {"inputs_embeds": step_embeds, "attention_mask": mask, "position_ids": positions}
        for layer, (k, v) in enumerate(past):
            feeds[kv_name(PAST, layer, "key")], feeds[kv_name(PAST, layer, "value")] = k, v
        # Only the hidden states: the step tokens' K/V and logits are not fetched (they never enter the cache).
        return self.engines["llm_decode"].run(feeds, names=("hidden_states",))["hidden_states"]

    def velocity(self, hidden: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return self.engines["gen_decoder"].run({"hidden_states": hidden, "skip": skip, "t_embeds": t_emb})["velocity"]

    def buffers(self, prompts: list[PromptKV], latent: torch.Tensor) -> StepBuffers:
        width = max(p.length for p in prompts)
        b = self._buffers
        if b is None or b.rows != len(prompts) or b.width != width:
            b = self._buffers = StepBuffers(len(prompts), width, self.tail, latent, prompts[0].past)
        return b

    def run(self, b: StepBuffers) -> torch.Tensor:
        return cfg_euler_step(self, b)
