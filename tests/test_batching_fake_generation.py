"""The scheduler's generation policy on a fake executor: pure torch arithmetic in place of the model
(no engines, no worker thread, no sleeping, no clock), driven iteration by iteration.

The fake's velocity of an image depends on its latent, its own timestep, its own prompt (through
the prompt K/V the step buffers hold for it, masked and right-aligned) and its own positions; each
image's latents are checked against the same arithmetic written per image in `expected` (the CFG
Euler loop of one image with nothing beside it), so a row that reads another row's prompt,
timestep, step count, CFG weight, positions or noise lands elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from jfexport.runtime.batching.chat_batch import ChatSlots
from jfexport.runtime.batching.generation_batch import GenerationRows
from jfexport.runtime.batching.generation_step import KV, PromptKV, StepBuffers, cfg_euler_step
from jfexport.runtime.batching.jobs import GenerationJob
from jfexport.runtime.batching.scheduler import Observers, Scheduler, fair_shares
from jfexport.runtime.errors import NonFiniteOutput, SchedulerStopped

from jfexport.core.schedulers import euler_schedule

BOS, PAD = 1, 0
NAN_TOKEN = 13  # its K is NaN: the image's velocity is NaN from the first step
RAISE_TOKEN = 15  # the LLM stage raises while a row of this prompt is in the batch
GRID = 2  # image tokens: GRID**2
LATENT = (2, 4, 4)
D = 3  # hidden size


class FakeExecutor:
    """A `GenerationExecutor` of pure arithmetic; it records the rows of every call."""

    def __init__(self) -> None:
        self.tail = 1 + GRID**2
        self.calls: list[tuple[str, int]] = []
        self._buffers: dict[tuple[int, int], StepBuffers] = {}

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> KV:
        self.calls.append(("prefill", ids.shape[0]))
        k = ids.double().where(ids != NAN_TOKEN, torch.nan)[:, None, :, None]  # [B,1,P,1]
        return [(k, positions.double()[:, None, :, None])]

    def encode(self, z: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.calls.append(("encode", z.shape[0]))
        rows = z.shape[0]
        t_emb = (timesteps / 1000)[:, None].expand(rows, D)
        z_embeds = z.flatten(1).mean(dim=1)[:, None, None].expand(rows, GRID**2, D)
        return t_emb, z_embeds, z

    def hidden(self, step_embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: KV) -> torch.Tensor:
        self.calls.append(("hidden", step_embeds.shape[0]))
        k = past[0][0][:, 0, :, 0]
        seen = mask[:, :k.shape[1]].double()
        if ((k == RAISE_TOKEN) & (seen > 0)).any():
            raise RuntimeError("the fake LLM does not take this token")
        prompt = (k * seen).sum(dim=1) / seen.sum(dim=1)  # the mean of the row's visible prompt tokens
        return step_embeds + prompt[:, None, None] + 1e-3 * positions[:, :, None]

    def velocity(self, hidden: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        self.calls.append(("velocity", hidden.shape[0]))
        return -0.5 * skip + 0.01 * hidden.mean(dim=(1, 2))[:, None, None, None] + 0.1 * t_emb[:, :1, None, None]

    def buffers(self, prompts: list[PromptKV], latent: torch.Tensor) -> StepBuffers:
        # Wider than the longest prompt: the left columns of every row are masked padding.
        width = 8 * (max(p.length for p in prompts) // 8 + 1)
        key = (len(prompts), width)
        if key not in self._buffers:
            self._buffers[key] = StepBuffers(len(prompts), width, self.tail, latent, prompts[0].past)
        return self._buffers[key]

    def run(self, b: StepBuffers) -> torch.Tensor:
        self.calls.append(("run", b.rows))
        return cfg_euler_step(self, b)


def expected(prompt: list[int], z0: torch.Tensor, steps: int, cfg: float, stop: int | None = None) -> torch.Tensor:
    """One image alone: the fake's arithmetic on its own prompt, written out per image (its latent
    after the first `stop` steps, when given)."""
    tokens = prompt[:-1]  # the last prompt token is not prefilled (JANUSFLOW.md 4.2)
    n = len(tokens)
    positions = torch.arange(n, n + 1 + GRID**2, dtype=torch.float64)[1:].mean()  # the image tokens'
    cond, uncond = sum(tokens) / n, float(tokens[0])  # the unconditional row sees its BOS only
    timesteps, dt = euler_schedule(steps, torch.float32)
    z = z0.clone()
    for k in range(steps if stop is None else stop):
        t = float(timesteps[k]) / 1000

        def v(prompt_mean: float) -> torch.Tensor:
            return -0.5 * z + 0.01 * (z.mean() + prompt_mean + 1e-3 * positions) + 0.1 * t

        z = z + dt * (cfg * v(cond) - (cfg - 1) * v(uncond))
    return z


class Harness:
    def __init__(self, max_images: int = 4):
        self.executor = FakeExecutor()
        self.observers = Observers()
        self.steps: list[int] = []  # rows of every generation step
        self.observers.add(lambda kind, rows: self.steps.append(rows) if kind == "generation" else None)
        generation = GenerationRows(self.executor, {}, PAD, max_images, self.observers)
        chat = ChatSlots({}, None, 2 * max_images, 64, 1 << 20, self.observers)
        self.scheduler = Scheduler(generation, chat, self.observers, start=False)

    def submit(self, prompts: list[list[int]], n: int = 1, steps: int = 3, cfg: float = 2.0,
               seed: int = 0) -> GenerationJob:
        z0 = torch.randn((len(prompts) * n, *LATENT), generator=torch.Generator().manual_seed(seed))
        job = GenerationJob(prompts, n, z0, steps, cfg, False, None, self.scheduler.alive)
        self.scheduler.submit(job)
        return job

    def iterate(self, times: int) -> None:
        for _ in range(times):
            self.scheduler.run_iteration()

    def drain(self) -> int:
        """Iterations until no work is left (bounded)."""
        for count in range(1, 100):
            if not self.scheduler.run_iteration():
                return count
        raise AssertionError("the scheduler did not run dry in 100 iterations")


def check(job: GenerationJob, prompts: list[list[int]], n: int, steps: int, cfg: float) -> None:
    assert job.finished and job.error is None
    assert job.latents.shape == (len(prompts) * n, *LATENT)
    for i in range(len(prompts) * n):
        want = expected(prompts[i // n], job.z0[i], steps, cfg)
        assert torch.allclose(job.latents[i], want, rtol=0, atol=1e-5), f"image {i}"


A = [BOS, 5, 7, 9, 2]
B = [BOS, 30, 4, 11, 6, 8, 21, 3, 2]  # longer: rows of other lengths side by side
C = [BOS, 2, 2]


def test_one_request_follows_the_cfg_euler_loop():
    h = Harness()
    job = h.submit([A], steps=4, cfg=3.0, seed=1)
    assert h.drain() == 4
    check(job, [A], 1, 4, 3.0)
    assert h.steps == [1, 1, 1, 1] and job.steps_done == 4


def test_rows_join_and_leave_between_steps_with_their_own_steps_and_cfg():
    h = Harness()
    slow = h.submit([A], steps=5, cfg=2.0, seed=1)
    h.iterate(2)
    fast = h.submit([B, C], steps=2, cfg=4.5, seed=2)  # joins at the third step, leaves after the fourth
    h.iterate(2)
    assert fast.finished and not slow.finished and slow.steps_done == 4
    late = h.submit([C], steps=1, cfg=1.0, seed=3)
    h.drain()
    assert h.steps == [1, 1, 3, 3, 2]  # `late` joins the last step of `slow`
    check(slow, [A], 1, 5, 2.0)
    check(fast, [B, C], 1, 2, 4.5)
    check(late, [C], 1, 1, 1.0)


def test_the_executor_runs_once_per_iteration_for_all_rows():
    h = Harness()
    h.submit([A, B], n=1, steps=3, seed=1)
    h.submit([C], n=2, steps=2, seed=2)
    h.iterate(1)
    stages = [c for c in h.executor.calls if c[0] != "prefill"]
    # One step of all 4 images: each stage once, the LLM and the decoder over both CFG halves.
    assert stages == [("run", 4), ("encode", 4), ("hidden", 8), ("velocity", 8)]
    h.executor.calls.clear()
    h.iterate(1)
    assert h.executor.calls == [("run", 4), ("encode", 4), ("hidden", 8), ("velocity", 8)]


def test_the_prompt_columns_are_reloaded_only_when_the_rows_change():
    h = Harness()
    h.submit([A], steps=3, seed=1)
    h.iterate(1)
    (b,) = h.executor._buffers.values()
    loaded = b.loaded
    h.iterate(1)
    assert b.loaded is loaded  # the same rows: the columns were not written again
    h.submit([A], steps=2, seed=2)  # another row of the same prompt: 2 rows, new buffers
    h.iterate(1)
    assert len(h.executor._buffers) == 2


def test_a_request_larger_than_one_call_runs_in_parts():
    h = Harness(max_images=2)
    big = h.submit([A, B], n=3, steps=2, seed=4)  # 6 images, 2 rows per call
    small = h.submit([C], steps=2, seed=5)
    h.drain()
    assert max(h.steps) == 2 and sum(h.steps) == 2 * 7  # every image took its 2 steps, 2 at a time
    check(big, [A, B], 3, 2, 2.0)  # in image order, each image with its own noise
    check(small, [C], 1, 2, 2.0)


def test_a_small_request_behind_a_large_one_starts_at_the_next_free_rows():
    h = Harness(max_images=2)
    big = h.submit([A, B], n=3, steps=2, seed=4)
    small = h.submit([C], steps=2, seed=5)
    h.iterate(2)
    # The first free rows were shared, one image each: `small` is done while most of `big` still waits
    # (first come first served would have run it after all six of big's images, at the 8th step).
    assert small.finished and big.pending == 5 and h.steps == [2, 2]
    h.drain()
    check(big, [A, B], 3, 2, 2.0)
    check(small, [C], 1, 2, 2.0)


@pytest.mark.parametrize("pending,free,shares", [
    ([6, 1], 2, [1, 1]),
    ([6, 1], 4, [3, 1]),
    ([1, 6, 2], 8, [1, 5, 2]),
    ([2, 2, 2], 3, [1, 1, 1]),
    ([3, 3], 1, [1, 0]),  # too few rows for everyone: the earlier request first
    ([1, 1], 5, [1, 1]),  # rows left over stay free
    ([], 4, []),
    ([4], 0, [0]),
])
def test_free_rows_are_shared_one_image_each_in_turn(pending, free, shares):
    assert fair_shares(pending, free) == shares


def test_a_nan_fails_only_its_request():
    h = Harness()
    ok = h.submit([A], steps=3, seed=1)
    bad = h.submit([[BOS, 4, NAN_TOKEN, 2]], n=2, steps=3, seed=2)
    other = h.submit([B], steps=2, seed=3)
    h.drain()
    assert isinstance(bad.error, NonFiniteOutput) and "at step 0 of this request" in str(bad.error)
    check(ok, [A], 1, 3, 2.0)
    check(other, [B], 1, 2, 2.0)
    assert h.steps == [4, 2, 1]  # the failed request's rows left after their first step


def test_a_raising_batch_is_retried_request_by_request():
    h = Harness()
    ok = h.submit([A], steps=2, seed=1)
    bad = h.submit([[BOS, RAISE_TOKEN, 2]], steps=2, seed=2)
    h.drain()
    assert isinstance(bad.error, RuntimeError) and "does not take this token" in str(bad.error)
    check(ok, [A], 1, 2, 2.0)


def test_run_iteration_is_for_schedulers_without_a_worker():
    h = Harness()
    assert h.scheduler.run_iteration() is False  # nothing to do
    job = h.submit([A], steps=2)
    h.scheduler.close()
    assert job.finished and job.error is not None  # closing fails what waits
    with pytest.raises(SchedulerStopped):
        h.scheduler.run_iteration()
