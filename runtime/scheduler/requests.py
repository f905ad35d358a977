"""Requests as the scheduler sees them (jobs) and as callers hold them (handles).

A job is written by the scheduler's worker thread and read by the caller's thread: every change
goes through the job's condition variable. Callers never run engine work, and the worker never
runs caller code (progress callbacks, `on_logits`, readers of a stream), so a slow or re-entrant
caller cannot stall or deadlock the engines.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from jfexport.reference.schedulers import FinishReason, StopRule

from ..errors import RequestCancelled, RequestTimeout, SchedulerStopped

# How often a waiting caller re-checks the deadline and the worker's health, in seconds: the
# bound on how long a caller can miss a dead worker or a deadline the worker cannot act on.
POLL_S = 0.1


class Job:
    """State shared by both kinds of request: completion, cancellation, deadline, error."""

    kind = "job"

    def __init__(self, timeout: float | None, alive: Callable[[], bool]):
        self.cond = threading.Condition()
        self.created = time.monotonic()
        self.deadline = None if timeout is None else self.created + timeout
        self.cancelled = False
        self.finished = False
        self.error: BaseException | None = None
        self._alive = alive

    def cancel(self) -> None:
        """Ask the worker to drop the request; it frees the request's rows at its next iteration."""
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if not self.finished:
                self.error, self.finished = error, True
                self.cond.notify_all()

    def complete(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def wait_for(self, ready: Callable[[], bool], timeout: float | None = None) -> None:
        """Block (holding `cond` on return) until `ready()` or the job ends; raise its error.

        The caller's own deadline is enforced here too, so a worker busy in a long engine call
        cannot hold a caller past it; a dead worker is noticed within POLL_S.
        """
        limit = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if self.finished:
                break
            now = time.monotonic()
            if self.expired(now):
                self.cancelled = True
                self.error, self.finished = RequestTimeout(f"{self.kind} request timed out after "
                                                           f"{self.deadline - self.created:.3g} s"), True
                break
            if limit is not None and now >= limit:
                raise TimeoutError(f"{self.kind} request not done within {timeout} s")
            if not self._alive():
                self.error, self.finished = SchedulerStopped("the scheduler stopped before the request finished"), True
                break
            self.cond.wait(POLL_S)
        if self.error is not None and not ready():
            raise self.error


class CallJob(Job):
    """A function run on the worker between iterations; its return value is the result."""

    kind = "call"

    def __init__(self, alive: Callable[[], bool]):
        super().__init__(None, alive)
        self.value: object = None

    def set_value(self, value: object) -> None:
        with self.cond:
            self.value, self.finished = value, True
            self.cond.notify_all()

    def result(self) -> object:
        with self.cond:
            self.wait_for(lambda: False)
        return self.value


class GenerationJob(Job):
    """One call's images: `prompt_ids[p]` for each prompt, `z[i]` the fp32 latent of image i."""

    kind = "generation"

    def __init__(self, prompt_ids: list[list[int]], n: int, z0: torch.Tensor, steps: int, cfg: float,
                 decode: bool, timeout: float | None, alive: Callable[[], bool]):
        super().__init__(timeout, alive)
        self.prompt_ids, self.n, self.steps, self.cfg, self.decode = prompt_ids, n, steps, cfg, decode
        self.z0 = z0
        self.steps_done = 0
        # Whether a waiter wants every step: waking idle callers each step costs the worker the GIL.
        self.watch_progress = False
        self.latents: torch.Tensor | None = None
        self.images: torch.Tensor | None = None  # uint8 [N,H,W,3]

    @property
    def rows(self) -> int:
        return len(self.prompt_ids) * self.n

    def set_progress(self, steps_done: int) -> None:
        with self.cond:
            self.steps_done = steps_done
            if self.watch_progress:
                self.cond.notify_all()

    def set_latents(self, latents: torch.Tensor) -> None:
        with self.cond:
            self.latents = latents
            if not self.decode:
                self.finished = True
            self.cond.notify_all()

    def set_images(self, images: torch.Tensor) -> None:
        with self.cond:
            self.images, self.finished = images, True
            self.cond.notify_all()


@dataclass(eq=False)  # identity: rows hold tensors, and two rows are never the same row
class ChatRow:
    """One question of a chat job: its prompt, its sampling state and the tokens decoded so far."""

    ids: list[int]
    pixels: torch.Tensor
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class ChatJob(Job):
    kind = "chat"

    def __init__(self, rows: list[ChatRow], rule: StopRule, temperature: float, top_p: float, keep_logits: bool,
                 timeout: float | None, alive: Callable[[], bool]):
        super().__init__(timeout, alive)
        self.chat_rows, self.rule, self.temperature, self.top_p = rows, rule, temperature, top_p
        self.keep_logits = keep_logits
        self.first_token_at: float | None = None

    @property
    def rows(self) -> int:
        return len(self.chat_rows)

    def push(self, row: ChatRow, token: int, logits: torch.Tensor, produced: int) -> FinishReason | None:
        """Record the row's next token; returns why the row ends, if it does."""
        reason = self.rule.finish_reason(token, produced)
        with self.cond:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            row.tokens.append(token)
            if self.keep_logits:
                row.logits.append(logits)
            row.finish_reason = reason
            if all(r.finish_reason is not None for r in self.chat_rows):
                self.finished = True
            self.cond.notify_all()
        return reason


class _Handle:
    """What both handles share: the job, cancellation and completion."""

    def __init__(self, job: Job):
        self._job = job
        # A handle dropped before its request ends cancels it instead of computing for nobody.
        weakref.finalize(self, job.cancel)

    def cancel(self) -> None:
        self._job.cancel()

    def done(self) -> bool:
        return self._job.finished


class GenerationHandle(_Handle):
    """A submitted text-to-image request."""

    def __init__(self, job: GenerationJob, to_images: Callable[[torch.Tensor], list]):
        super().__init__(job)
        self._to_images = to_images

    @property
    def progress(self) -> tuple[int, int]:
        return self._job.steps_done, self._job.steps

    def wait(self, timeout: float | None = None, on_step: Callable[[int, int], None] | None = None) -> None:
        """Until the request is done; `on_step(done, total)` runs here, on the caller's thread."""
        job, seen = self._job, 0
        target = (lambda: job.images is not None) if job.decode else (lambda: job.latents is not None)
        job.watch_progress = on_step is not None
        limit = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if limit is None else max(0.0, limit - time.monotonic())
            with job.cond:
                job.wait_for(lambda: target() or (on_step is not None and job.steps_done > seen), left)
                done_steps, ready = job.steps_done, target()
            if on_step is not None:
                for k in range(seen + 1, done_steps + 1):
                    on_step(k, job.steps)
            seen = done_steps
            if ready:
                return

    def latents(self, timeout: float | None = None, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        self.wait(timeout, on_step)
        return self._job.latents

    def result(self, timeout: float | None = None, on_step: Callable[[int, int], None] | None = None) -> list:
        """The PIL images, in prompt order (`n` per prompt)."""
        if not self._job.decode:
            raise ValueError("this request was submitted for latents only: use latents()")
        self.wait(timeout, on_step)
        return self._to_images(self._job.images)


class ChatHandle(_Handle):
    """A submitted question: iterate it for token ids as they are decoded (EOS is not yielded)."""

    def __init__(self, job: ChatJob, tokenizer, prompt_tokens: int):
        super().__init__(job)
        self._row = job.chat_rows[0]
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens

    @property
    def token_ids(self) -> list[int]:
        return [t for t in self._row.tokens if t != self._job.rule.eos_id]

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._row.finish_reason

    def __iter__(self) -> Iterator[int]:
        job, row, eos = self._job, self._row, self._job.rule.eos_id
        i = 0
        while True:
            with job.cond:
                job.wait_for(lambda: len(row.tokens) > i)
                if len(row.tokens) <= i:
                    return
                token = row.tokens[i]
            i += 1
            if token == eos:
                return
            yield token

    def text(self, timeout: float | None = None) -> str:
        job = self._job
        with job.cond:
            job.wait_for(lambda: False, timeout)  # until it ends; raises its error if it failed
        return self.tokenizer.decode(self.token_ids)


def stream_rows(job: ChatJob) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The job's rows in lockstep: ([B] tokens, [B,V] logits or None) per step, ended rows padded with EOS.

    Ends when every row has ended; closing the iterator cancels the job."""
    eos = job.rule.eos_id
    step = 0
    try:
        while True:
            with job.cond:
                job.wait_for(lambda: all(len(r.tokens) > step or r.finish_reason is not None for r in job.chat_rows))
                if all(len(r.tokens) <= step for r in job.chat_rows):
                    return
                tokens = [r.tokens[step] if len(r.tokens) > step else eos for r in job.chat_rows]
                logits = None
                if job.keep_logits:
                    # Rows that have ended compute nothing more: their logits are NaN from then on.
                    width = next(r.logits[step] for r in job.chat_rows if len(r.logits) > step).shape[-1]
                    logits = torch.stack([r.logits[step] if len(r.logits) > step else torch.full((width,), float("nan"))
                                          for r in job.chat_rows])
            step += 1
            yield torch.tensor(tokens, dtype=torch.long), logits
    finally:
        if not job.finished:
            job.cancel()
