"""The CUDA-graph capture helpers the fast torch executors share (`torch_generation`, `fast_chat`,
`fast_prefill`).

Replaying a captured graph removes the per-kernel launch overhead that dominates small batches;
a step whose kernels cannot be captured runs eagerly instead (`capture_or_none`).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def capture_graph(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """`step` captured as a CUDA graph over the static buffers it reads and writes. It runs twice
    first on a side stream (kernel selection, allocator warm-up), as capture requires; callers
    undo or overwrite what those runs wrote."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def capture_or_none(step: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
    """`capture_graph(step)`, or None (logged) where a kernel of the step cannot be captured: the
    caller then runs the step eagerly, so an op that breaks capture costs speed, not requests."""
    try:
        return capture_graph(step)
    except RuntimeError:
        log.warning("CUDA-graph capture failed; running eagerly", exc_info=True)
        return None


# Static K/V lengths are rounded up to this so that requests of similar length share a graph.
DECODE_BUCKET = 256


def prompt_bucket(length: int, max_len: int, smallest: int = 16) -> int:
    """Prompt length rounded up to a power of two (at least `smallest`): CUDA graphs are captured per
    bucket, and left padding (masked) fills the difference."""
    if length > max_len:
        raise ValueError(f"prompt of {length} tokens exceeds the built maximum {max_len}")
    bucket = smallest
    while bucket < length:
        bucket *= 2
    return min(bucket, max_len)
