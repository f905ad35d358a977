"""Step-level continuous batching of text-to-image: which rows take the next step, and their state.

Every in-flight image is a row with its own latent, step index, schedule (steps, dt), CFG weight
and prompt K/V (the conditional row's own; the unconditional row's, which depends on the prompt
length only, prefilled once per length and shared). Each iteration runs one Euler step for all
active rows (`generation_step`, through the executor given at construction: the engines, or the
model directly). New prompts are prefilled together and their images join at the next iteration;
finished latents leave and wait for the VAE, which decodes them in batches.

Previews: a row whose request asked for k previews has k steps of its schedule marked
(`preview_steps`); after such a step its clean-latent estimate is computed from the step's
velocity, and the estimates of all rows marked at this step go through the VAE in one call. Rows
that asked for none take no part in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from jfexport.core.images import to_uint8
from jfexport.core.layout import cfg_prompt_rows, offset_positions
from jfexport.core.processor.processor import left_pad
from jfexport.core.schedulers import FlowEulerCFGScheduler, clean_estimate, preview_steps

from ..engine import Engine
from ..errors import NonFiniteOutput, RuntimeFailure
from ..lru import LRU
from .generation_step import GenerationExecutor, PromptKV, advance
from .jobs import GenerationPart


@dataclass(eq=False)  # identity: rows hold tensors, and two rows are never the same row
class _Row:
    job: GenerationPart
    prompt: PromptKV
    z: torch.Tensor  # [C,h,w] fp32
    schedule: FlowEulerCFGScheduler
    image: int  # the image's index in its job
    previews: tuple[int, ...]  # the steps whose clean-latent estimate is decoded as a preview
    k: int = 0


Failure = tuple[GenerationPart, BaseException]

# Prompt lengths whose unconditional row K/V are kept (each at most max_seq columns).
UNCOND_LENGTHS = 64


class GenerationRows:
    """The rows in flight and what happens to them: admission, prefill, the step of all rows
    (through `executor`), failures attributed to their request, the VAE batches."""

    def __init__(self, executor: GenerationExecutor, engines: Mapping[str, Engine], pad_id: int, max_images: int,
                 observe: Callable[[str, int], None]):
        self.executor = executor
        # Read for `vae_decoder` at each call, as the executors read theirs: whoever holds the runtime's
        # mapping (the bench's timed proxies) sees every call. Without one the runtime takes no request that needs it.
        self.engines = engines
        self.pad_id = pad_id
        self.max_images = max_images  # rows per call: the LLM runs 2 per image
        self.observe = observe
        self.rows: list[_Row] = []
        self.to_decode: list[GenerationPart] = []
        self._uncond: LRU[int, list] = LRU(UNCOND_LENGTHS)  # prompt length -> unconditional row K/V, per layer [Hkv,P,Dh]

    @property
    def active_rows(self) -> int:
        return len(self.rows)

    def jobs(self) -> set[GenerationPart]:
        return {r.job for r in self.rows} | set(self.to_decode)

    def drop(self, job: GenerationPart) -> None:
        self.rows = [r for r in self.rows if r.job is not job]
        self.to_decode = [j for j in self.to_decode if j is not job]

    # -- prefill -----------------------------------------------------------------------------

    def prefill(self, jobs: list[GenerationPart]) -> list[Failure]:
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
        out = self.executor.prefill(ids[select], mask[select], offset_positions(pad, width)[select])
        self.observe("prefill", len(select))
        device = out[0][0].device
        mask = mask.to(device)

        def columns(row: int, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [(k[row, :, start:], v[row, :, start:]) for k, v in out]

        for j, (n, p) in enumerate(missing.items()):
            self._uncond.put(n, [(k.clone(), v.clone()) for k, v in columns(count + j, int(pad[p]))])
        states: list[PromptKV] = []
        for p in range(count):
            # Keep each prompt's own columns: from its BOS on, positions start at 0 there.
            start = int(pad[p])
            uncond = self._uncond.get(lengths[p])
            if uncond is None:  # put above for every missing length, and the LRU holds more lengths than a batch
                raise RuntimeError(f"the unconditional K/V of length {lengths[p]} left the cache mid-prefill")
            past = [(torch.stack([k, uk]), torch.stack([v, uv])) for (k, v), (uk, uv) in zip(columns(p, start), uncond)]
            states.append(PromptKV(past, mask[[p, count + p], start:]))
        p = 0
        for job in jobs:
            schedule = FlowEulerCFGScheduler(job.steps, job.cfg, torch.float32)
            marked = preview_steps(job.steps, job.previews)
            for prompt_index in range(len(job.prompt_ids)):
                for i in range(job.n):
                    image = prompt_index * job.n + i
                    z = job.z0[image].float().to(device)
                    self.rows.append(_Row(job, states[p + prompt_index], z, schedule, image, marked))
            p += len(job.prompt_ids)
        return []

    # -- one Euler step ----------------------------------------------------------------------

    def step(self) -> list[Failure]:
        """One Euler step of every active row; a failing batched call is retried job by job so
        that only the request at fault fails."""
        try:
            return self._step(self.rows)
        except Exception as e:  # noqa: BLE001 - the error is the result of the requests at fault
            jobs = list(dict.fromkeys(r.job for r in self.rows))
            if len(jobs) == 1:
                return [(jobs[0], e)]
            failures: list[Failure] = []
            for job in jobs:
                try:
                    failures += self._step([r for r in self.rows if r.job is job])
                except Exception as e:  # noqa: BLE001 - the error is the request's result
                    failures.append((job, e))
            return failures

    def _step(self, rows: list[_Row]) -> list[Failure]:
        count = len(rows)
        z = torch.stack([r.z for r in rows])
        timesteps = torch.stack([r.schedule.timesteps[r.k] for r in rows])
        cfg = torch.tensor([r.schedule.cfg for r in rows], dtype=torch.float32).view(count, 1, 1, 1)
        dt = torch.stack([r.schedule.dt for r in rows]).view(count, 1, 1, 1)
        z_next, v = advance(self.executor, [r.prompt for r in rows], z, timesteps, cfg, dt)
        self.observe("generation", count)
        bad = ~torch.isfinite(z_next).flatten(1).all(dim=1)
        failures: dict[GenerationPart, BaseException] = {}
        for i, r in enumerate(rows):
            if bool(bad[i]):
                failures.setdefault(r.job, NonFiniteOutput(f"gen_decoder: output 'velocity' has NaN/Inf values at "
                                                           f"step {r.k} of this request"))
        marked = [i for i, r in enumerate(rows) if r.k in r.previews and r.job not in failures]
        estimates = None
        if marked:
            remaining = torch.stack([(rows[i].schedule.steps - rows[i].k) * rows[i].schedule.dt for i in marked])
            estimates = clean_estimate(z[marked], v[marked], remaining.view(-1, 1, 1, 1).to(z.device))
        for i, r in enumerate(rows):
            if r.job in failures:
                continue
            r.z, r.k = z_next[i], r.k + 1
        if estimates is not None:
            for job, error in self._previews([rows[i] for i in marked], estimates):
                failures.setdefault(job, error)
        self._finish()
        return list(failures.items())

    def _previews(self, rows: list[_Row], estimates: torch.Tensor) -> list[Failure]:
        """One VAE call for the previews of `rows` (their step just taken, `r.k - 1`), handed to their
        jobs; an error fails the jobs that wanted them and never re-runs the step."""
        try:
            images = self._vae().run({"latents": estimates})["images"]
        except Exception as e:  # noqa: BLE001 - the error is the result of the requests that asked for previews
            return [(job, e) for job in dict.fromkeys(r.job for r in rows)]
        self.observe("vae", len(rows))
        finite = torch.isfinite(images).flatten(1).all(dim=1)
        pictures = to_uint8(images).cpu()
        failures: list[Failure] = []
        per_job: dict[GenerationPart, list] = {}
        for i, r in enumerate(rows):
            if not bool(finite[i]):
                failures.append((r.job, NonFiniteOutput("vae_decoder: output 'images' has NaN/Inf values for a "
                                                        "preview of this request")))
                continue
            per_job.setdefault(r.job, []).append((r.image, r.previews.index(r.k - 1), pictures[i]))
        for job, previews in per_job.items():
            if job not in {j for j, _ in failures}:
                job.add_previews(previews)
        return failures

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

    def decode_batch(self) -> list[GenerationPart]:
        """The next jobs for the VAE, whole jobs at a time, within the engines' row limit per call."""
        batch: list[GenerationPart] = []
        for job in self.to_decode:
            if batch and sum(j.rows for j in batch) + job.rows > 2 * self.max_images:
                break
            batch.append(job)
        self.to_decode = self.to_decode[len(batch):]
        return batch

    def _vae(self) -> Engine:
        vae = self.engines.get("vae_decoder")
        if vae is None:  # the runtime refuses what needs it (`JanusFlowRuntime._need`)
            raise RuntimeFailure("vae_decoder: this runtime opened no VAE engine")
        return vae

    def decode(self, jobs: list[GenerationPart]) -> list[Failure]:
        done = [job.latents for job in jobs if job.latents is not None]
        if len(done) != len(jobs):  # a job joins `to_decode` with its latents set
            raise RuntimeError("a request reached the VAE without its latents")
        latents = torch.cat(done)
        images = self._vae().run({"latents": latents})["images"]
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
