"""The runtime's failures (`RuntimeFailure`, jfexport/core/errors.py): each names the graph, output or limit at fault."""

from __future__ import annotations

import torch

from jfexport.core.errors import RuntimeFailure, UserError


class BackendUnavailable(UserError):
    """The backend asked for cannot run here (unknown, not installed, no GPU): the user chooses another."""


class NonFiniteOutput(RuntimeFailure):
    pass


def check_finite(graph: str, output: str, tensor: torch.Tensor, step: int | None = None) -> None:
    """Raise if a graph produced NaN/Inf: a silent NaN would otherwise surface as a black image."""
    if not torch.isfinite(tensor).all():
        where = f" at step {step}" if step is not None else ""
        bad = (~torch.isfinite(tensor)).sum().item()
        raise NonFiniteOutput(f"{graph}: output {output!r} has {bad} NaN/Inf values{where}")


class Overloaded(RuntimeFailure):
    """The scheduler's queue is full: retry later (a service answers 429/503 with Retry-After)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(RuntimeFailure):
    pass


class WaitTimeout(RuntimeFailure, TimeoutError):
    """A caller's wait (a handle's `timeout`) ended before its request did. The request goes on: wait
    again, or cancel it. A TimeoutError too, as `concurrent.futures` raises."""


class RequestCancelled(RuntimeFailure):
    pass


class SchedulerStopped(RuntimeFailure):
    """The scheduler was closed, or died: no request is served any more."""
