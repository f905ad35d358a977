"""Continuous batching of concurrent requests over one set of engines (see `scheduler`)."""

from .handles import ChatHandle, GenerationHandle
from .scheduler import Scheduler

__all__ = ["ChatHandle", "GenerationHandle", "Scheduler"]
