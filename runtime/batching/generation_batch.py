"""Step-level continuous batching of text-to-image over the graph contract.

Every in-flight image is a row with its own latent, step index, schedule (steps, dt), CFG weight
and prompt K/V (the conditional row's own; the unconditional row's, which depends on the prompt
length only, prefilled once per length and shared). Each iteration runs one Euler step for all active rows in one `gen_encoder`, one
`llm_decode` and one `gen_decoder` call: per-row timesteps, and prompts of different lengths side
by side, each prompt's K/V right-aligned in the batch's past with its left columns masked and its
own positions (the step tokens never enter the cache, so a row's past never changes). New
prompts are prefilled together and their images join at the next iteration; finished latents
leave and wait for the VAE, which decodes them in batches.

Batched rows are laid out as the single-request loop lays them out: the R conditional rows, then
the R unconditional ones; the ODE state stays fp32 whatever the engines' precision.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from jfexport.core.graph_contract import PRESENT, count_layers, kv_name
from jfexport.core.images import to_uint8
from jfexport.core.layout import cfg_prompt_rows, offset_positions
from jfexport.core.processor.processor import left_pad
from jfexport.core.schedulers import FlowEulerCFGScheduler, cfg_velocity, euler_step

from ..engine import Engine
from ..lru import LRU
from ..errors import NonFiniteOutput
from .jobs import GenerationJob


@dataclass(eq=False)  # identity: rows hold tensors, and two rows are never the same row
class _Prompt:
    """One prompt's CFG pair after prefill: K/V [2,Hkv,P,Dh] per layer (cond, uncond), mask [2,P]."""

    past: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor

    @property
    def length(self) -> int:
        return self.mask.shape[1]


_serials = itertools.count()


@dataclass(eq=False)  # identity: rows hold tensors, and two rows are never the same row
class _Row:
    job: GenerationJob
    prompt: _Prompt
    z: torch.Tensor  # [C,h,w] fp32
    schedule: FlowEulerCFGScheduler
    k: int = 0
    # Identity for the batch cache: id() of a finished row can be reused by a new one.
    serial: int = field(default_factory=lambda: next(_serials))


Failure = tuple[GenerationJob, BaseException]

# Prompt lengths whose unconditional row K/V are kept (each at most max_seq columns).
UNCOND_LENGTHS = 64


class GenerationRows:
    def __init__(self, engines: Mapping[str, Engine], pad_id: int, grid: int, max_images: int,
                 observe: Callable[[str, int], None]):
        self.engines, self.pad_id, self.grid = engines, pad_id, grid
        self.max_images = max_images  # rows per call: llm_decode runs 2 per image
        self.observe = observe
        self.rows: list[_Row] = []
        self.to_decode: list[GenerationJob] = []
        self._batch_key: tuple[int, ...] | None = None
        self._batch: tuple[dict, torch.Tensor, torch.Tensor] | None = None
        self._uncond: LRU[int, list] = LRU(UNCOND_LENGTHS)  # prompt length -> unconditional row K/V, per layer [Hkv,P,Dh]

    @property
    def active_rows(self) -> int:
        return len(self.rows)

    def fits(self, job: GenerationJob) -> bool:
        return len(self.rows) + job.rows <= self.max_images

    def jobs(self) -> set[GenerationJob]:
        return {r.job for r in self.rows} | set(self.to_decode)

    def drop(self, job: GenerationJob) -> None:
        self.rows = [r for r in self.rows if r.job is not job]
        self.to_decode = [j for j in self.to_decode if j is not job]

    # -- prefill -----------------------------------------------------------------------------

    def prefill(self, jobs: list[GenerationJob]) -> list[Failure]:
        prompts = [(job, ids) for job in jobs for ids in job.prompt_ids]
        cond_ids, cond_mask = left_pad([ids for _, ids in prompts], self.pad_id)
        ids, mask, pad = cfg_prompt_rows(cond_ids, cond_mask, self.pad_id)
        width = ids.shape[1]
        count = len(prompts)
        lengths = [width - int(pad[p]) for p in range(count)]
        # The unconditional row (BOS, then masked pads) depends on the prompt's length only: it is
        # prefilled once per length and shared by every prompt of that length.
        missing = {n: p for p, n in reversed(list(enumerate(lengths))) if self._uncond.get(n) is None}
        select = list(range(count)) + [count + p for p in missing.values()]
        positions = offset_positions(pad, width)[select]
        embeds = self.engines["embed_tokens"].run({"input_ids": ids[select]})["inputs_embeds"]
        device = embeds.device
        mask = mask.to(device)
        out = self.engines["llm_prefill"].run({"inputs_embeds": embeds, "attention_mask": mask[select],
                                               "position_ids": positions.to(device)})
        self.observe("prefill", len(select))
        layers = count_layers(out)

        def columns(row: int, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [(out[kv_name(PRESENT, i, "key")][row, :, start:], out[kv_name(PRESENT, i, "value")][row, :, start:])
                    for i in range(layers)]

        for j, (n, p) in enumerate(missing.items()):
            self._uncond.put(n, [(k.clone(), v.clone()) for k, v in columns(count + j, int(pad[p]))])
        states: list[_Prompt] = []
        for p in range(count):
            # Keep each prompt's own columns: from its BOS on, positions start at 0 there.
            start = int(pad[p])
            uncond = self._uncond.get(lengths[p])
            past = [(torch.stack([k, uk]), torch.stack([v, uv])) for (k, v), (uk, uv) in zip(columns(p, start), uncond)]
            states.append(_Prompt(past, mask[[p, count + p], start:]))
        p = 0
        for job in jobs:
            schedule = FlowEulerCFGScheduler(job.steps, job.cfg, torch.float32)
            for prompt_index in range(len(job.prompt_ids)):
                for i in range(job.n):
                    z = job.z0[prompt_index * job.n + i].float().to(device)
                    self.rows.append(_Row(job, states[p + prompt_index], z, schedule))
            p += len(job.prompt_ids)
        return []

    # -- one Euler step ----------------------------------------------------------------------

    def step(self) -> list[Failure]:
        """One Euler step of every active row; a failing batched call is retried job by job so
        that only the request at fault fails."""
        try:
            return self._step(self.rows, cache=True)
        except Exception as e:  # noqa: BLE001 - the error is the result of the requests at fault
            self._batch_key = self._batch = None
            jobs = list(dict.fromkeys(r.job for r in self.rows))
            if len(jobs) == 1:
                return [(jobs[0], e)]
            failures: list[Failure] = []
            for job in jobs:
                try:
                    failures += self._step([r for r in self.rows if r.job is job], cache=False)
                except Exception as e:  # noqa: BLE001 - the error is the request's result
                    failures.append((job, e))
            return failures

    def _past(self, rows: list[_Row], cache: bool) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Batched past K/V, mask and step positions of `rows`; unchanged while the rows are."""
        key = tuple(r.serial for r in rows)
        if cache and key == self._batch_key:
            return self._batch
        tail = 1 + self.grid**2
        width = max(r.prompt.length for r in rows)
        count = len(rows)
        past: dict[str, torch.Tensor] = {}
        for layer, pair in enumerate(rows[0].prompt.past):
            for part, ref in zip(("key", "value"), pair):
                batch = ref.new_zeros((2 * count, ref.shape[1], width, ref.shape[3]))
                for i, r in enumerate(rows):
                    cond_uncond = r.prompt.past[layer][0 if part == "key" else 1]
                    batch[i, :, width - r.prompt.length:] = cond_uncond[0]
                    batch[count + i, :, width - r.prompt.length:] = cond_uncond[1]
                past[kv_name("past", layer, part)] = batch
        device = rows[0].prompt.mask.device
        mask = torch.zeros((2 * count, width + tail), dtype=torch.long, device=device)
        positions = torch.empty((2 * count, tail), dtype=torch.long, device=device)
        steps = torch.arange(tail, device=device)
        for i, r in enumerate(rows):
            for half in (0, 1):
                mask[half * count + i, width - r.prompt.length: width] = r.prompt.mask[half]
                positions[half * count + i] = r.prompt.length + steps
        mask[:, width:] = 1
        result = (past, mask, positions)
        if cache:
            self._batch_key, self._batch = key, result
        return result

    def _euler(self, rows: list[_Row], cache: bool) -> torch.Tensor:
        """The latents [R,C,h,w] of `rows` after one CFG Euler step (a hook: the fast path calls the
        model directly instead of the engines)."""
        count = len(rows)
        past, mask, positions = self._past(rows, cache)
        e = self.engines
        z = torch.stack([r.z for r in rows])
        timesteps = torch.stack([r.schedule.timesteps[r.k] for r in rows]).to(z.device)
        enc = e["gen_encoder"].run({"latents": z, "timesteps": timesteps})
        t_emb = enc["t_embeds"].repeat(2, 1)
        step_embeds = torch.cat([t_emb[:, None, :], enc["z_embeds"].repeat(2, 1, 1)], dim=1)
        # Only the hidden states: the step tokens' K/V and logits are not fetched (they never enter the cache).
        hidden = e["llm_decode"].run({"inputs_embeds": step_embeds, "attention_mask": mask, "position_ids": positions,
                                      **past}, names=("hidden_states",))["hidden_states"]
        v_raw = e["gen_decoder"].run({"hidden_states": hidden[:, 1:], "skip": enc["skip"].repeat(2, 1, 1, 1),
                                      "t_embeds": t_emb})["velocity"].float()
        shape = (count, 1, 1, 1)
        cfg = torch.tensor([r.schedule.cfg for r in rows], dtype=torch.float32, device=z.device).view(shape)
        dt = torch.stack([r.schedule.dt for r in rows]).to(z.device).view(shape)
        return euler_step(z, cfg_velocity(v_raw[:count], v_raw[count:], cfg), dt)

    def _step(self, rows: list[_Row], cache: bool) -> list[Failure]:
        count = len(rows)
        z_next = self._euler(rows, cache)
        self.observe("generation", count)
        bad = ~torch.isfinite(z_next).flatten(1).all(dim=1)
        failures: dict[GenerationJob, BaseException] = {}
        for i, r in enumerate(rows):
            if bool(bad[i]):
                failures.setdefault(r.job, NonFiniteOutput(f"gen_decoder: output 'velocity' has NaN/Inf values at "
                                                           f"step {r.k} of this request"))
        for i, r in enumerate(rows):
            if r.job in failures:
                continue
            r.z, r.k = z_next[i], r.k + 1
        self._finish()
        return list(failures.items())

    def _finish(self) -> None:
        """Rows that took their last step leave; their job gets its latents (and waits for the VAE)."""
        done = [r for r in self.rows if r.k == r.schedule.steps]
        if not done:
            for job in {r.job for r in self.rows}:
                job.set_progress(max(r.k for r in self.rows if r.job is job))
            return
        self.rows = [r for r in self.rows if r.k < r.schedule.steps]
        for job in dict.fromkeys(r.job for r in done):
            job.set_progress(job.steps)
            job.set_latents(torch.stack([r.z for r in done if r.job is job]).cpu())
            if job.decode:
                self.to_decode.append(job)
        for job in {r.job for r in self.rows}:
            job.set_progress(max(r.k for r in self.rows if r.job is job))

    # -- VAE ---------------------------------------------------------------------------------

    def decode_batch(self) -> list[GenerationJob]:
        """The next jobs for the VAE, whole jobs at a time, within the engines' row limit per call."""
        batch: list[GenerationJob] = []
        for job in self.to_decode:
            if batch and sum(j.rows for j in batch) + job.rows > 2 * self.max_images:
                break
            batch.append(job)
        self.to_decode = self.to_decode[len(batch):]
        return batch

    def decode(self, jobs: list[GenerationJob]) -> list[Failure]:
        latents = torch.cat([job.latents for job in jobs])
        images = self.engines["vae_decoder"].run({"latents": latents})["images"]
        self.observe("vae", latents.shape[0])
        failures: list[Failure] = []
        start = 0
        for job in jobs:
            part = images[start: start + job.rows]
            start += job.rows
            if not torch.isfinite(part).all():
                failures.append((job, NonFiniteOutput("vae_decoder: output 'images' has NaN/Inf values for this request")))
                continue
            job.set_images(to_uint8(part).cpu())
        return failures
