"""The serving scheduler: one worker thread owns the engines and forms every engine call from all
active requests (continuous batching, DESIGN.md "Serving").

Each iteration, in this order:
1. requests cancelled or past their deadline leave (queued or running), freeing their rows;
2. chat: queued questions that fit the free K/V slots are prefilled together and get their first
   token; then every active row decodes one token;
3. generation: queued prompts whose images fit are prefilled together; then every active image
   takes one Euler step;
4. questions that arrived during that step are prefilled; finished latents are decoded by the
   VAE (one batched call).
So the engines alternate between one chat token and one Euler step: a question that arrives
while images are generated waits at most for the step in flight before it is prefilled, and
images advance while answers stream. Rows are shared, image rows and K/V slots alike: when
they free up, the waiting requests of that kind take one row each in turn (an image, or one of a
question's `n` answers), first come first, until the rows run out (`fair_shares`). A request takes
the rows it is given and the rest join as rows free up (in parts, `GenerationPart`, `ChatPart`),
so a request may hold more images than one engine call, and a small request behind a large one
starts at the next free rows instead of after all of the large one's rows; the earlier request
takes the first turn of every round, so a large one is not starved either.

Failures stay with their request: a batched call that raises is retried request by request, and
a NaN is attributed to its row. Anything that escapes the loop stops the scheduler and fails
every waiting and running request with SchedulerStopped instead of leaving callers hanging.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

import torch

from jfexport import defaults

from ..errors import Overloaded, RequestCancelled, RequestTimeout, SchedulerStopped
from .chat_batch import ChatSlots
from .generation_batch import GenerationRows
from .jobs import CallJob, ChatJob, ChatPart, GenerationJob, GenerationPart, Job

log = logging.getLogger(__name__)

Observer = Callable[[str, int], None]
Failure = tuple[Job | GenerationPart | ChatPart, BaseException]
# What a batched phase takes: the parts of requests that the rows and slots hold.
Work = TypeVar("Work", ChatPart, GenerationPart)
Queued = TypeVar("Queued", ChatJob, GenerationJob)
Value = TypeVar("Value")


class Observers:
    """The batch observers: `fn(kind, rows)` after every batched engine step, on the worker thread.
    The rows and slots call it; an observer's bug must not fail the requests of the batch."""

    def __init__(self) -> None:
        self._fns: list[Observer] = []

    def add(self, fn: Observer) -> None:
        self._fns.append(fn)

    def __call__(self, kind: str, rows: int) -> None:
        for fn in self._fns:
            try:
                fn(kind, rows)
            except Exception:
                log.exception("batch observer failed")


class Scheduler:
    """Decides what runs; `generation` and `chat` (built by the caller over the executors it chose)
    run it. `observers` is what both report their batches to.

    `start=False` makes no worker thread: the caller runs the iterations (`run_iteration`), as a
    test does to drive the scheduler step by step; nothing may then wait for a result on that
    thread (`torch_threads`, a handle's `result`), since the iteration it waits for is its own."""

    def __init__(self, generation: GenerationRows, chat: ChatSlots, observers: Observers,
                 max_queue: int = defaults.MAX_QUEUE, torch_threads: int | None = None, start: bool = True):
        self.max_queue = max_queue
        self._torch_threads = torch_threads
        self._observers = observers
        self.generation = generation
        self.chat = chat
        # How free image rows are shared among the waiting image requests (a bench swaps in others).
        self.share_rows: Callable[[Sequence[int], int], list[int]] = fair_shares
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], CallJob[Any]]] = collections.deque()
        self._closed = False
        self._death: BaseException | None = None
        self._iteration_s = 0.01  # running mean of one iteration: the Retry-After estimate
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="jfexport-scheduler", daemon=True)
            self._thread.start()

    # -- caller side -------------------------------------------------------------------------

    def alive(self) -> bool:
        if self._thread is None:
            return not self._closed and self._death is None
        return self._thread.is_alive() and self._death is None

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed or not self.alive():
                raise self._stopped()
            if len(self._queue) >= self.max_queue:
                # Roughly the time for the queue ahead to be admitted, at one request per iteration.
                raise Overloaded(f"{len(self._queue)} requests are queued (the limit): retry later",
                                 retry_after=max(1.0, round(len(self._queue) * self._iteration_s, 1)))
            self._queue.append(job)
            self._cond.notify_all()

    def call(self, fn: Callable[[], Value], job: CallJob[Value]) -> None:
        """Run `fn` on the worker between iterations (engine work outside the two request kinds)."""
        with self._cond:
            if self._closed or not self.alive():
                raise self._stopped()
            self._calls.append((fn, job))
            self._cond.notify_all()

    def _stopped(self) -> SchedulerStopped:
        return SchedulerStopped("the scheduler is stopped" + (f" ({self._death!r})" if self._death else ""))

    def torch_threads(self) -> int:
        """torch's intra-op thread count on the worker, where the runtime's torch work runs."""
        job: CallJob[int] = CallJob(self.alive)
        self.call(torch.get_num_threads, job)
        return job.result()

    def add_observer(self, fn: Observer) -> None:
        """`fn(kind, rows)` after every batched engine step, on the worker thread: keep it short."""
        self._observers.add(fn)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"queue_depth": len(self._queue), "max_queue": self.max_queue,
                    "active_generation_rows": self.generation.active_rows, "active_chat_rows": self.chat.active_rows}

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is None:
            self._fail_all(SchedulerStopped("the scheduler stopped"))
        elif threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def run_iteration(self) -> bool:
        """One iteration on the caller's thread, for a scheduler made with `start=False`; whether
        work is left (queued, in flight or waiting for the VAE). An error that escapes it stops
        the scheduler as it would stop the worker, and is raised here."""
        if self._thread is not None:
            raise RuntimeError("this scheduler runs its iterations on its own worker thread")
        if not self.alive():
            raise self._stopped()
        try:
            self._iteration()
        except BaseException as e:
            self._death = e
            self._fail_all(SchedulerStopped(f"the scheduler stopped on {e!r}"))
            raise
        with self._cond:
            return self._busy()

    # -- worker side -------------------------------------------------------------------------

    def _busy(self) -> bool:
        g = self.generation
        return bool(self._queue or self._calls or g.rows or g.to_decode or self.chat.rows)

    def _run(self) -> None:
        try:
            if self._torch_threads is not None:
                torch.set_num_threads(self._torch_threads)
            while True:
                with self._cond:
                    while not self._closed and not self._busy():
                        self._cond.wait()
                    if self._closed:
                        return
                started = time.monotonic()
                self._iteration()
                self._iteration_s = 0.9 * self._iteration_s + 0.1 * (time.monotonic() - started)
        except BaseException as e:  # noqa: BLE001 - reported to every waiter below
            self._death = e
            log.exception("the scheduler stopped on an unexpected error")
        finally:
            self._fail_all(SchedulerStopped("the scheduler stopped" + (f" on {self._death!r}" if self._death else "")))

    def _fail_all(self, error: SchedulerStopped) -> None:
        with self._cond:
            waiting = list(self._queue) + [job for _, job in self._calls]
            self._queue.clear()
            self._calls.clear()
        for job in waiting + list(self.generation.jobs()) + list(self.chat.jobs()):
            job.fail(error)
        # Their rows leave too, so that stats() of a stopped scheduler counts none in flight.
        for part in self.generation.jobs():
            self.generation.drop(part)
        try:
            for chat_job in self.chat.jobs():
                self.chat.drop(chat_job)
        except Exception:  # noqa: BLE001 - a cache the failure left broken is never used again
            log.warning("the K/V slots of a stopped scheduler could not be released", exc_info=True)

    def _iteration(self) -> None:
        self._run_calls()
        self._expire()
        self._admit_chat()
        if self.chat.rows:
            self._settle(self.chat.step())
        self._generation()
        # Questions that arrived during the Euler step start now, not after the VAE.
        self._admit_chat()
        if self.generation.to_decode:
            self._isolated(self.generation.decode, self.generation.decode_batch())

    def _run_calls(self) -> None:
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
        for fn, job in calls:
            try:
                job.set_value(fn())
            except Exception as e:  # noqa: BLE001 - the error is the call's result
                job.fail(e)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cond:
            gone = [j for j in self._queue if j.cancelled or j.expired(now)]
            for job in gone:
                self._queue.remove(job)
        running = {_request(j) for j in self.generation.jobs() | self.chat.jobs() if j.cancelled or j.expired(now)}
        for job in dict.fromkeys(gone + list(running)):
            self._drop(job, self._ended(job, now))

    @staticmethod
    def _ended(job: Job, now: float) -> BaseException:
        if job.deadline is not None and job.expired(now) and not job.cancelled:
            return RequestTimeout(f"{job.kind} request timed out after {job.deadline - job.created:.3g} s")
        return RequestCancelled(f"{job.kind} request cancelled")

    def _drop(self, job: Job | GenerationPart | ChatPart, error: BaseException) -> None:
        job = _request(job)
        if isinstance(job, (GenerationJob, ChatJob)):
            with self._cond:
                if job in self._queue:  # rows still waiting for their turn
                    self._queue.remove(job)
        if isinstance(job, GenerationJob):
            for part in job.parts:
                self.generation.drop(part)
        elif isinstance(job, ChatJob):
            self.chat.drop(job)
        job.fail(error)

    def _settle(self, failures: Sequence[Failure]) -> None:
        for job, error in failures:
            log.info("%s request failed: %s", _request(job).kind, error)
            self._drop(job, error)

    def _isolated(self, phase: Callable[[list[Work]], Sequence[Failure]], jobs: list[Work]) -> None:
        """Run a batched phase; if it raises, run it again job by job so the culprit fails alone."""
        try:
            self._settle(phase(jobs))
        except Exception as e:
            if len(jobs) == 1:
                self._settle([(jobs[0], e)])
                return
            for job in jobs:
                if _request(job).finished:  # a part of a request that another part failed
                    continue
                try:
                    self._settle(phase([job]))
                except Exception as e:  # noqa: BLE001 - the error is the request's result
                    self._settle([(job, e)])

    def _admit_chat(self) -> None:
        """Prefill rows of the queued questions for the free K/V slots; each row gets its first token."""
        chat = self.chat
        with self._cond:  # a question answered with no token needs no slot: it ends where it stands
            prefill_only = [j for j in self._queue if isinstance(j, ChatJob) and j.rule.max_new_tokens == 0]
            for job in prefill_only:
                self._queue.remove(job)
        for job in prefill_only:
            job.complete_at_limit()
        admitted = self._admit_parts(ChatJob, chat.slots - chat.active_rows)
        if admitted:
            self._isolated(chat.prefill, admitted)

    def _generation(self) -> None:
        gen = self.generation
        admitted = self._admit_parts(GenerationJob, gen.max_images - gen.active_rows)
        if admitted:
            self._isolated(gen.prefill, admitted)
        if gen.rows:
            self._settle(gen.step())

    def _admit_parts(self, kind: type[Queued], free: int) -> list[Any]:
        """Parts of the queued requests of `kind` for `free` rows (image rows or K/V slots), shared out
        by `share_rows` (`fair_shares`); a request leaves the queue once all of its rows are admitted."""
        parts: list[Any] = []
        if free <= 0:  # the usual iteration while rows run: nothing to hand out, no queue to walk
            return parts
        with self._cond:
            waiting = [job for job in self._queue if isinstance(job, kind)]
            for job, share in zip(waiting, self.share_rows([job.pending for job in waiting], free)):
                while share > 0:  # an image part holds images of one prompt: a share may span several
                    parts.append(job.take_part(share))
                    share -= parts[-1].rows
                if not job.pending:
                    self._queue.remove(job)
        return parts


def fair_shares(pending: Sequence[int], free: int) -> list[int]:
    """How many of `free` rows each waiting request gets: one each in turn, first come first, until
    the rows or the requests run out. A request behind a large one starts at the next free rows
    instead of after all of the large one's images, and the large one still gets its turn first
    each round (it is never starved either)."""
    shares = [0] * len(pending)
    while free > 0 and any(share < want for share, want in zip(shares, pending)):
        for i, want in enumerate(pending):
            if free > 0 and shares[i] < want:
                shares[i] += 1
                free -= 1
    return shares


def _request(job: Job | GenerationPart | ChatPart) -> Job:
    """The request a job of the rows belongs to (a part's request, else the job itself)."""
    return job.job if isinstance(job, (GenerationPart, ChatPart)) else job
