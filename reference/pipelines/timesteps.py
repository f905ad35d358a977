"""The Euler schedule of the official sampler: t_k = k/S * 1000 fed to the model, z += dt * v."""

from __future__ import annotations

import torch


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
