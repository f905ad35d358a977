"""Rectified-flow Euler sampling with classifier-free guidance (JANUSFLOW.md 4.4).

The official loop: t_k = k/S (fed to the model as t_k * 1000), v = w*v_cond - (w-1)*v_uncond,
z += dt*v with dt = 1/S, for k = 0..S-1 from Gaussian noise at t = 0 to the image at t = 1.
`FlowEulerCFGScheduler` holds one request's schedule in the style of diffusers' schedulers
(`timesteps`, `step`); `cfg_velocity` and `euler_step` are the arithmetic, shared by whole-batch
loops (a float w and dt) and by the serving scheduler, whose rows each carry their own w and dt
as broadcastable tensors.

Previews: at step k the model's velocity points from z_k straight at the image, so the clean
latent it predicts is z_k + (1 - t_k)·v_k (`clean_estimate`); the remaining time is written
(S - k)·dt, which at the last step is dt itself, so there the estimate is the final latent bit for
bit. `preview_steps` spreads a request's previews over the steps before the last.
"""

from __future__ import annotations

import torch

Scalar = float | torch.Tensor


def euler_schedule(steps: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(model timesteps [steps], dt scalar) rounded to `dtype` as the official loop does.

    In bf16 this reproduces the demo's quantised values (t = 0, 33.25, 66.5, ... and
    dt = 0.033447265625 for 30 steps); in fp32 it is the exact schedule.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.tensor([k / steps * 1000.0 for k in range(steps)], dtype=torch.float32).to(dtype)
    dt = torch.tensor(1.0 / steps, dtype=torch.float32).to(dtype)
    return t, dt


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg: Scalar) -> torch.Tensor:
    """Classifier-free guidance as the official code writes it: w*v_cond - (w-1)*v_uncond."""
    return cfg * v_cond - (cfg - 1.0) * v_uncond


def euler_step(z: torch.Tensor, v: torch.Tensor, dt: Scalar) -> torch.Tensor:
    return z + dt * v


def clean_estimate(z: torch.Tensor, v: torch.Tensor, remaining: Scalar) -> torch.Tensor:
    """The clean latent the velocity `v` at `z` heads for: z + remaining·v, with `remaining` the
    time left to t = 1, (steps - k)·dt at step k (broadcastable per row)."""
    return z + remaining * v


def preview_steps(steps: int, previews: int) -> tuple[int, ...]:
    """The steps (0-based) whose velocity gives preview 0..previews-1: floor((i+1)(steps-1)/(previews+1)),
    evenly spread before the last step (whose estimate is the final image) and all distinct,
    which needs previews < steps."""
    if not 0 <= previews < steps:
        raise ValueError(f"{previews} previews need at least {previews + 1} steps, got {steps}")
    return tuple((i + 1) * (steps - 1) // (previews + 1) for i in range(previews))


class FlowEulerCFGScheduler:
    """One request's Euler schedule: `steps` model timesteps and their common dt."""

    def __init__(self, steps: int, cfg: float, dtype: torch.dtype = torch.float32):
        self.steps = steps
        self.cfg = cfg
        self.timesteps, self.dt = euler_schedule(steps, dtype)

    def step(self, z: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(next z, guided velocity) for the current step."""
        v = cfg_velocity(v_cond, v_uncond, self.cfg)
        return euler_step(z, v, self.dt), v
