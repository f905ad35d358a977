"""Putting the fast torch executors (`fast_generation`, `fast_chat`) under a scheduler."""

from __future__ import annotations

from .chat_batch import ChatSlots
from .fast_chat import DEFAULT_CHUNK, TorchChatExecutor
from .fast_generation import FastGenerationRows
from .fast_prefill import PrefillGraphs
from .scheduler import Scheduler


def install_fast_paths(scheduler: Scheduler, model, cuda_graphs: bool, chunk: int = DEFAULT_CHUNK,
                       compile_step: bool = False) -> None:
    """Replace the scheduler's engine-path executors by the fast ones over `model` (the model its
    torch engines run). Call it before the first request: the executors hold the rows in flight.
    `compile_step`: the Euler step through torch.compile (`FastGenerationRows`).

    The scheduler builds its executors itself; the swap happens under its lock so that the worker,
    which reads them only after being woken under that lock, never sees a half-made change.
    """
    gen, chat = scheduler.generation, scheduler.chat
    if gen.rows or gen.to_decode or chat.rows:
        raise RuntimeError("install_fast_paths needs an idle scheduler")
    fast_gen = FastGenerationRows(gen.engines, gen.pad_id, gen.grid, gen.max_images, gen.observe, model, cuda_graphs,
                                  compile_step)
    executor = TorchChatExecutor(model, cuda_graphs, chunk,
                                 PrefillGraphs(model, chat.processor.tokenizer.pad_id, chat.max_len, cuda_graphs),
                                 chat.executor)
    fast_chat = ChatSlots(executor, chat.processor, chat.max_rows, chat.max_len, chat.kv_budget_bytes, chat.observe,
                          chat.kv_layout, chat.prefixes.budget_bytes)
    with scheduler._cond:
        scheduler.generation, scheduler.chat = fast_gen, fast_chat
