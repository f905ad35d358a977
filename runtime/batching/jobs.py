"""Requests as the scheduler sees them (jobs); callers hold them through handles (handles.py).

A job is written by the scheduler's worker thread and read by the caller's thread: every change
goes through the job's condition variable. Callers never run engine work, and the worker never
runs caller code (progress callbacks, `on_logits`, readers of a stream), so a slow or re-entrant
caller cannot stall or deadlock the engines.

The one exception is for callers that must not hold a thread while they wait (an event loop
serving thousands of requests): `add_done_callback` and `add_listener` register notifications
that run on the thread that changed the job (usually the worker), after it released every lock,
each in its own try (an exception is logged, never raised into the worker). They are meant to
hand the news over (`loop.call_soon_threadsafe`) and return: they may call the runtime's
non-blocking methods (submit, cancel, `tokens_since`, `stats`), but a wait for a request's
result from inside one raises RuntimeError, since the worker it would wait for is the thread
running it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, TypeVar, cast

import torch

from jfexport.core.processor.request_checks import check_timeout
from jfexport.core.schedulers import FinishReason, StopRule, TokenLogprobs

from ..errors import RequestTimeout, RuntimeFailure, SchedulerStopped, WaitTimeout

Value = TypeVar("Value")

log = logging.getLogger(__name__)

# Set while a job's notifications run: a blocking wait there would wait for the thread it is on.
_notifying = threading.local()

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
        # Notifications (under `cond`): run once each, outside the lock, by whoever ended the job.
        self._done_callbacks: list[Callable[[], None]] = []
        self._listeners: list[Callable[[], None]] = []
        self._notified_end = False

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
        self._notify_end()

    def complete(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()
        self._notify_end()

    # -- notifications without a waiting thread ------------------------------------------------

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """`fn()` once the job ends (done, failed, cancelled, timed out or its worker stopped).

        Runs on the thread that ended it, with no lock held (see the module docstring); at once,
        here, when the job has already ended. A caller that does not wait must still have its
        deadline and a dead worker noticed: `poll()` does what a waiting caller would."""
        with self.cond:
            if not self._notified_end:
                self._done_callbacks.append(fn)
                return
        _run_notifications([fn])

    def add_listener(self, fn: Callable[[], None]) -> Callable[[], None]:
        """`fn()` after every update the worker publishes (a chat token, an Euler step) and once at
        the end, as done callbacks run; returns a function that removes it. A listener reads the
        state itself (`ChatHandle.tokens_since`): updates may be coalesced, never lost."""
        with self.cond:
            ended = self._notified_end
            if not ended:
                self._listeners.append(fn)
        if ended:
            _run_notifications([fn])

        def remove() -> None:
            with self.cond:
                if fn in self._listeners:
                    self._listeners.remove(fn)

        return remove

    def _notify(self) -> None:
        """Tell the listeners that something changed (called with no lock held)."""
        if self._listeners:  # read without the lock: a listener added meanwhile reads the state itself
            with self.cond:
                listeners = list(self._listeners)
            _run_notifications(listeners)

    def _notify_end(self) -> None:
        """Run the end notifications once, if the job has ended (called with no lock held)."""
        with self.cond:
            if not self.finished or self._notified_end:
                return
            self._notified_end = True
            listeners, callbacks = self._listeners, self._done_callbacks
            self._listeners, self._done_callbacks = [], []
        _run_notifications(listeners + callbacks)

    @contextlib.contextmanager
    def waiting(self):
        """`with job.cond` for a caller that may end the job itself (its deadline, a dead worker):
        the end notifications run after the lock is released."""
        try:
            with self.cond:
                yield
        finally:
            self._notify_end()

    # -- the caller's side ----------------------------------------------------------------------

    def _end_if_overdue(self, now: float) -> None:
        """Under `cond`: what the worker may be too busy (or dead) to do: the deadline, a dead worker."""
        if self.finished:
            return
        if self.expired(now):
            self.cancelled = True
            self.error, self.finished = RequestTimeout(f"{self.kind} request timed out after "
                                                       f"{(self.deadline or now) - self.created:.3g} s"), True
        elif not self._alive():
            self.error, self.finished = SchedulerStopped("the scheduler stopped before the request finished"), True
        if self.finished:
            self.cond.notify_all()

    def poll(self) -> bool:
        """Without blocking: end the job if it is past its deadline or its worker is gone, as a
        waiting caller would; whether it has ended."""
        with self.waiting():
            self._end_if_overdue(time.monotonic())
            return self.finished

    def wait_for(self, ready: Callable[[], bool], deadline: float | None = None) -> None:
        """Block (holding `cond` on return) until `ready()` or the job ends; raise its error.

        `deadline` (`time.monotonic()` time, see `wait_deadline`) is the caller's: past it,
        WaitTimeout, and the request goes on. It is enforced here too, so a worker busy in a long
        engine call cannot hold a caller past it; a dead worker is noticed within POLL_S. Hold the
        lock with `waiting()`, so that a job ended here still notifies.
        """
        if getattr(_notifying, "active", False) and not (ready() or self.finished):
            raise RuntimeError(f"a {self.kind} request was waited for from inside a request notification, which "
                               "runs on the scheduler's worker: the wait would never end")
        while not ready():
            now = time.monotonic()
            self._end_if_overdue(now)
            if self.finished:
                break
            if deadline is not None and now >= deadline:
                raise WaitTimeout(f"{self.kind} request still running when the wait's timeout ended; it goes on: "
                                  "wait again, or cancel it")
            self.cond.wait(POLL_S)
        if self.error is not None and not ready():
            raise self.error


def wait_deadline(timeout: object) -> float | None:
    """The `time.monotonic()` time a caller's wait of `timeout` seconds ends (None: it does not)."""
    seconds = check_timeout(timeout, zero=True)
    return None if seconds is None else time.monotonic() + seconds


def _run_notifications(fns: list[Callable[[], None]]) -> None:
    """Each in its own try: a failing notification is logged and never reaches the worker."""
    if not fns:
        return
    outer = getattr(_notifying, "active", False)
    _notifying.active = True
    try:
        for fn in fns:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a caller's bug must not stop the scheduler
                log.exception("a request notification failed")
    finally:
        _notifying.active = outer


class CallJob(Job, Generic[Value]):
    """A function run on the worker between iterations; its return value is the result."""

    kind = "call"

    def __init__(self, alive: Callable[[], bool]):
        super().__init__(None, alive)
        self.value: Value | None = None

    def set_value(self, value: Value) -> None:
        with self.cond:
            self.value, self.finished = value, True
            self.cond.notify_all()
        self._notify_end()

    def result(self) -> Value:
        with self.waiting():
            self.wait_for(lambda: False)  # until it ends; raises the call's error if it failed
        return cast(Value, self.value)  # set with `finished`: None only where the function returned None


class GenerationJob(Job):
    """One call's images: `prompt_ids[p]` for each prompt, `z0[i]` the fp32 initial latent of image i.

    A request may hold more images than one engine call takes: the scheduler admits it in parts
    (`take_part`), each some images of one prompt, as rows free up. Every image keeps its own noise
    and its own row, so the result is the one a build with a larger `max_batch` computes."""

    kind = "generation"

    def __init__(self, prompt_ids: list[list[int]], n: int, z0: torch.Tensor, steps: int, cfg: float,
                 decode: bool, timeout: float | None, alive: Callable[[], bool], previews: int = 0):
        super().__init__(timeout, alive)
        self.prompt_ids, self.n, self.steps, self.cfg, self.decode = prompt_ids, n, steps, cfg, decode
        self.z0 = z0
        self.previews = previews  # per image, decoded at `preview_steps(steps, previews)`
        # (image, preview index, uint8 [H,W,3]) in the order the worker decoded them.
        self.preview_images: list[tuple[int, int, torch.Tensor]] = []
        self.steps_done = 0
        # Whether a waiter wants every step: waking idle callers each step costs the worker the GIL.
        self.watch_progress = False
        self.latents: torch.Tensor | None = None
        self.images: torch.Tensor | None = None  # uint8 [N,H,W,3]
        self.parts: list[GenerationPart] = []  # admitted, in image order (worker thread only)
        self._next_image = 0

    @property
    def rows(self) -> int:
        return len(self.prompt_ids) * self.n

    @property
    def pending(self) -> int:
        """Images not admitted yet."""
        return self.rows - self._next_image

    def take_part(self, images: int) -> "GenerationPart":
        """The next at most `images` images, all of one prompt (so a part prefills its prompt once)."""
        start = self._next_image
        stop = min(start + images, (start // self.n + 1) * self.n)
        part = GenerationPart(self, start, stop)
        self.parts.append(part)
        self._next_image = stop
        return part

    def set_progress(self, steps_done: int) -> None:
        with self.cond:
            self.steps_done = steps_done
            if self.watch_progress:
                self.cond.notify_all()
        self._notify()

    def add_previews(self, previews: list[tuple[int, int, torch.Tensor]]) -> None:
        with self.cond:
            self.preview_images.extend(previews)
            self.cond.notify_all()
        self._notify()

    def set_latents(self, latents: torch.Tensor) -> None:
        with self.cond:
            self.latents = latents
            if not self.decode:
                self.finished = True
            self.cond.notify_all()
        self._notify_end() if self.finished else self._notify()

    def set_images(self, images: torch.Tensor) -> None:
        with self.cond:
            self.images, self.finished = images, True
            self.cond.notify_all()
        self._notify_end()

    # -- what the parts report (worker thread) ---------------------------------------------------

    def _part_progressed(self) -> None:
        # Image-steps done over all images: parts admitted later make the bar move on, never back.
        self.set_progress(sum(p.steps_done * p.rows for p in self.parts) // self.rows)

    def _part_finished(self, attribute: str) -> None:
        if self.pending or any(getattr(p, attribute) is None for p in self.parts):
            return
        whole = torch.cat([getattr(p, attribute) for p in self.parts])
        self.set_latents(whole) if attribute == "latents" else self.set_images(whole)


class GenerationPart:
    """Images [start, stop) of a GenerationJob, all of one prompt: what the generation rows hold.

    It answers as a job does for the rows (prompt, noise, schedule, results) and hands its results,
    its failure and its cancellation to the request it belongs to."""

    kind = "generation"

    def __init__(self, job: GenerationJob, start: int, stop: int):
        self.job = job
        self.prompt_ids = [job.prompt_ids[start // job.n]]
        self.n = stop - start
        self.z0 = job.z0[start:stop]
        self.steps, self.cfg, self.decode, self.previews = job.steps, job.cfg, job.decode, job.previews
        self.start = start
        self.steps_done = 0
        self.latents: torch.Tensor | None = None
        self.images: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.n

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled

    @property
    def finished(self) -> bool:
        return self.job.finished

    def expired(self, now: float) -> bool:
        return self.job.expired(now)

    def fail(self, error: BaseException) -> None:
        self.job.fail(error)

    def set_progress(self, steps_done: int) -> None:
        self.steps_done = steps_done
        self.job._part_progressed()

    def add_previews(self, previews: list[tuple[int, int, torch.Tensor]]) -> None:
        self.job.add_previews([(self.start + image, index, picture) for image, index, picture in previews])

    def set_latents(self, latents: torch.Tensor) -> None:
        self.latents = latents
        self.job._part_finished("latents")

    def set_images(self, images: torch.Tensor) -> None:
        self.images = images
        self.job._part_finished("images")


@dataclass(eq=False)  # identity: rows hold tensors, and two rows are never the same row
class ChatRow:
    """One question of a chat job: its prompt, its sampling state and the tokens decoded so far."""

    ids: list[int]
    pixels: torch.Tensor
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, where the job asks for them
    finish_reason: FinishReason | None = None


class ChatJob(Job):
    kind = "chat"

    def __init__(self, rows: list[ChatRow], rule: StopRule, temperature: float, top_p: float, keep_logits: bool,
                 timeout: float | None, alive: Callable[[], bool], top_logprobs: int | None = None):
        """`keep_logits`: every token's logits [V] are kept (`stream_rows`); `top_logprobs`: every
        token's log-probability and that many alternatives are kept (`TokenLogprobs`), None for none."""
        super().__init__(timeout, alive)
        self.chat_rows, self.rule, self.temperature, self.top_p = rows, rule, temperature, top_p
        self.keep_logits, self.top_logprobs = keep_logits, top_logprobs
        self.first_token_at: float | None = None
        self._next_row = 0  # rows before it are admitted (they hold, or held, a K/V slot)

    @property
    def rows(self) -> int:
        return len(self.chat_rows)

    @property
    def pending(self) -> int:
        """Rows not admitted yet."""
        return self.rows - self._next_row

    def take_part(self, rows: int) -> "ChatPart":
        """The next at most `rows` rows, to be prefilled together."""
        start = self._next_row
        self._next_row = min(start + rows, self.rows)
        return ChatPart(self, self.chat_rows[start:self._next_row])

    @property
    def wants_logits(self) -> bool:
        """Whether the decode step must hand this job's logits back to the host (a cost others do not pay)."""
        return self.keep_logits or self.top_logprobs is not None

    def complete_at_limit(self) -> None:
        """End a question asked for no token (max_new_tokens 0: its prompt is all it has) as an answer
        that reached its length limit, so every row says why it ended."""
        with self.cond:
            for row in self.chat_rows:
                row.finish_reason = row.finish_reason or "length"
        self.complete()

    def end_row(self, row: ChatRow) -> None:
        """End one row early (its caller has what it wants, e.g. a stop sequence) while the others go on;
        the worker frees its slot at its next token."""
        with self.cond:
            if self.finished or row.finish_reason is not None:  # a failed job stays failed
                return
            row.finish_reason = "stop"
            self.finished = all(r.finish_reason is not None for r in self.chat_rows)
            self.cond.notify_all()
        self._notify_end() if self.finished else self._notify()

    def push(self, row: ChatRow, token: int, logits: torch.Tensor | None, produced: int,
             logprobs: TokenLogprobs | None = None) -> FinishReason | None:
        """Record the row's next token (with its logits and logprobs where the job keeps them); returns
        why the row ends, if it does (also when it was ended already)."""
        reason = self.rule.finish_reason(token, produced)
        with self.cond:
            if row.finish_reason is not None:  # ended by `end_row`: nothing more is recorded
                return row.finish_reason
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if self.top_logprobs is not None:
                if logprobs is None:
                    raise RuntimeFailure(f"chat: the decode step kept no logprobs for a row that asked for them (token {token})")
                row.logprobs.append(logprobs)
            row.tokens.append(token)
            if self.keep_logits:
                if logits is None:
                    raise RuntimeFailure(f"chat: the decode step kept no logits for a row that keeps them (token {token})")
                row.logits.append(logits)
            row.finish_reason = reason
            if all(r.finish_reason is not None for r in self.chat_rows):
                self.finished = True
            self.cond.notify_all()
        self._notify_end() if self.finished else self._notify()
        return reason


@dataclass(eq=False)
class ChatPart:
    """Rows of a ChatJob admitted together. A request's answers may start at different iterations:
    each row samples with its own generator, so when it starts changes nothing of what it answers."""

    job: ChatJob
    chat_rows: list[ChatRow]

    @property
    def rows(self) -> int:
        return len(self.chat_rows)


def stream_rows(job: ChatJob) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The job's rows in lockstep: ([B] tokens, [B,V] logits or None) per step, ended rows padded with EOS.

    Ends when every row has ended; closing the iterator cancels the job."""
    eos = job.rule.eos_id
    step = 0
    try:
        while True:
            with job.waiting():
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
