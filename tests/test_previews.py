"""Streamed previews: the clean-latent estimate of the rectified flow, the steps that take one, and
the rows that compute them (on the fake executor of test_batching_fake_generation, with a VAE of
pure arithmetic), driven iteration by iteration."""

from __future__ import annotations

import pytest
import torch
from jfexport.runtime.batching.chat_batch import ChatSlots
from jfexport.runtime.batching.generation_batch import GenerationRows
from jfexport.runtime.batching.handles import GenerationHandle
from jfexport.runtime.batching.jobs import GenerationJob
from jfexport.runtime.batching.scheduler import Observers, Scheduler

from jfexport.core.images import to_uint8
from jfexport.core.processor.errors import RequestError
from jfexport.core.processor.request_checks import check_previews
from jfexport.core.schedulers import FlowEulerCFGScheduler, clean_estimate, euler_schedule, preview_steps

from .test_batching_fake_generation import BOS, LATENT, PAD, FakeExecutor, expected

A = [BOS, 5, 7, 9, 2]
B = [BOS, 30, 4, 11, 6, 8, 21, 3, 2]


def _loop(z0: torch.Tensor, velocity, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference Euler loop (FlowEulerCFGScheduler.step), with the estimate at every step."""
    s = FlowEulerCFGScheduler(steps, cfg=2.0)
    z, estimates = z0, []
    for k in range(steps):
        z_next, v = s.step(z, velocity(z, k, 1.0), velocity(z, k, 0.0))
        estimates.append(clean_estimate(z, v, (steps - k) * s.dt))
        z = z_next
    return z, estimates


def test_the_estimate_at_the_last_step_is_the_final_latent_bit_for_bit():
    z0 = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0))
    final, estimates = _loop(z0, lambda z, k, c: torch.sin(3 * z + k) * (1 + c), steps=7)
    assert torch.equal(estimates[-1], final)
    assert not torch.equal(estimates[-2], final)  # elsewhere the flow is curved: an estimate, not the image


def test_on_a_straight_flow_every_estimate_is_the_image():
    # A constant velocity moves z in a straight line from the noise (t = 0) to the image (t = 1): the
    # estimate from any step points at the end. A wrong direction of t (t·v) or sign misses it.
    z0 = torch.randn(*LATENT, generator=torch.Generator().manual_seed(1))
    c = torch.randn(*LATENT, generator=torch.Generator().manual_seed(2))
    final, estimates = _loop(z0, lambda z, k, cond: c, steps=10)
    for k, e in enumerate(estimates):
        assert torch.allclose(e, final, rtol=0, atol=1e-5), k
    assert torch.allclose(final, z0 + c, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps, previews, want", [
    (30, 3, (7, 14, 21)), (30, 2, (9, 19)), (30, 1, (14,)), (4, 3, (0, 1, 2)), (2, 1, (0,)), (5, 0, ()),
])
def test_preview_steps_are_spread_before_the_last(steps, previews, want):
    assert preview_steps(steps, previews) == want


def test_more_previews_than_steps_before_the_last_are_refused():
    with pytest.raises(ValueError, match="3 previews need at least 4 steps"):
        preview_steps(3, 3)
    with pytest.raises(RequestError, match="partial_images: 2 previews need at least 3 steps"):
        check_previews(2, 2, "partial_images")
    with pytest.raises(RequestError, match="previews: 4 is outside the accepted range 0 .. 3"):
        check_previews(4, 30)


class ArithmeticVAE:
    """A `vae_decoder` engine of pure arithmetic that records the rows of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def run(self, feeds):
        latents = feeds["latents"]
        self.calls.append(latents.shape[0])
        return {"images": torch.tanh(latents[:, :1].expand(-1, 3, -1, -1) + latents[:, 1:2])}


class Harness:
    def __init__(self, max_images: int = 4):
        self.vae = ArithmeticVAE()
        self.steps: list[int] = []
        observers = Observers()
        observers.add(lambda kind, rows: self.steps.append(rows) if kind == "generation" else None)
        generation = GenerationRows(FakeExecutor(), {"vae_decoder": self.vae}, PAD, max_images, observers)
        self.scheduler = Scheduler(generation, ChatSlots({}, None, 2 * max_images, 64, 1 << 20, observers),
                                   observers, start=False)

    def submit(self, prompts, n: int = 1, steps: int = 5, cfg: float = 2.0, seed: int = 0,
               previews: int = 0) -> GenerationJob:
        z0 = torch.randn((len(prompts) * n, *LATENT), generator=torch.Generator().manual_seed(seed))
        job = GenerationJob(prompts, n, z0, steps, cfg, True, None, self.scheduler.alive, previews)
        self.scheduler.submit(job)
        return job

    def drain(self) -> None:
        for _ in range(100):
            if not self.scheduler.run_iteration():
                return
        raise AssertionError("the scheduler did not run dry in 100 iterations")


def test_previews_batch_only_the_rows_that_want_one_and_leave_the_images_as_they_are():
    h = Harness()
    plain = h.submit([B], n=2, steps=5, seed=3)
    streamed = h.submit([A], n=1, steps=5, seed=4, previews=2)
    h.drain()
    marked = preview_steps(5, 2)
    # One VAE call per preview step, holding only the row that asked (the others pay nothing), then
    # the final images (both requests in one call).
    assert h.vae.calls == [1] * len(marked) + [3], h.vae.calls
    assert h.steps == [3] * 5
    assert [(image, index) for image, index, _ in streamed.preview_images] == [(0, 0), (0, 1)]
    assert plain.preview_images == []

    alone = Harness()
    same = alone.submit([A], n=1, steps=5, seed=4)
    alone.drain()
    assert torch.equal(streamed.latents, same.latents) and torch.equal(streamed.images, same.images)


def test_each_preview_is_the_vae_of_the_clean_latent_estimate_at_its_step():
    h = Harness()
    steps, cfg = 6, 3.0
    job = h.submit([A, B], n=2, steps=steps, cfg=cfg, seed=5, previews=3)
    h.drain()
    dt = euler_schedule(steps, torch.float32)[1]
    got = {(image, index): picture for image, index, picture in job.preview_images}
    assert sorted(got) == [(i, j) for i in range(4) for j in range(3)]
    for i in range(4):
        prompt, z0 = [A, B][i // 2], job.z0[i]
        for j, k in enumerate(preview_steps(steps, 3)):
            z_k, z_next = _run(prompt, z0, steps, cfg, k), _run(prompt, z0, steps, cfg, k + 1)
            estimate = clean_estimate(z_k, (z_next - z_k) / dt, (steps - k) * dt)
            want = to_uint8(torch.tanh(estimate[None, :1].expand(-1, 3, -1, -1) + estimate[None, 1:2]))[0]
            # (z_next - z_k) / dt recovers v up to rounding: a pixel may differ by one level.
            assert (got[(i, j)].int() - want.int()).abs().max() <= 1, (i, j)
    assert not torch.equal(got[(0, 0)], got[(0, 2)])  # the picture forms as the steps go


def _run(prompt: list[int], z0: torch.Tensor, steps: int, cfg: float, k: int) -> torch.Tensor:
    """z after the first k steps of a `steps`-step schedule (the fake's arithmetic of `expected`)."""
    return expected(prompt, z0, steps, cfg, stop=k)


def test_the_handle_yields_previews_as_they_come_then_the_images():
    h = Harness()
    job = h.submit([A], n=1, steps=4, seed=6, previews=3)
    handle = GenerationHandle(job, lambda images: [f"picture of {tuple(images.shape)}"] * images.shape[0])
    seen = []
    for _ in range(3):  # prefill + first step, then a step each
        h.scheduler.run_iteration()
        seen += handle.previews_since(len(seen))[0]
    assert [(p.index, p.image) for p in seen] == [(0, 0), (1, 0), (2, 0)]
    assert not job.finished and handle.previews_since(3) == ([], False)
    h.drain()
    assert handle.previews_since(3) == ([], True)
    assert [p.index for p in handle.previews()] == [0, 1, 2]
    assert seen[0].picture == f"picture of {(1, *LATENT[1:], 3)}"
