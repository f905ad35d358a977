"""Requests as callers hold them: a handle reads its job (jobs.py) and never runs engine work.

A handle dropped before its request ends cancels it, so nobody computes for a caller that left.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generic, Iterator, TypeVar

import torch

from jfexport.core.processor.errors import RequestError
from jfexport.core.processor.request_checks import check_index
from jfexport.core.schedulers import FinishReason, TokenLogprobs

from ..errors import RuntimeFailure
from .jobs import ChatJob, GenerationJob, Job, wait_deadline

if TYPE_CHECKING:
    from PIL import Image


J = TypeVar("J", bound=Job)


class _Handle(Generic[J]):
    """What both handles share: the job, cancellation and completion."""

    def __init__(self, job: J):
        self._job = job
        # A handle dropped before its request ends cancels it instead of computing for nobody.
        weakref.finalize(self, job.cancel)

    def cancel(self) -> None:
        self._job.cancel()

    def done(self) -> bool:
        return self._job.finished

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """`fn()` once the request ends, on the scheduler's thread (at once if it has): see `Job.add_done_callback`.

        For callers that must not block a thread per request (an event loop): hand the news over
        (`loop.call_soon_threadsafe`) and return; the result is then read without waiting."""
        self._job.add_done_callback(fn)

    def add_listener(self, fn: Callable[[], None]) -> Callable[[], None]:
        """`fn()` after each new token or step and at the end; returns its remover (`Job.add_listener`)."""
        return self._job.add_listener(fn)

    def exception(self) -> BaseException | None:
        """Without blocking: the error the request ended with; None while it runs, or once it succeeded."""
        return self._job.error if self._job.finished else None

    def poll(self) -> bool:
        """Without blocking: whether the request has ended, enforcing its deadline as a waiting caller would."""
        return self._job.poll()


@dataclass(frozen=True)
class Preview:
    """One preview: its index among the image's previews (0 first), the picture, and which of the
    request's images it shows (its index in `result()`)."""

    index: int
    picture: "Image.Image"
    image: int


class GenerationHandle(_Handle[GenerationJob]):
    """A submitted text-to-image request."""

    def __init__(self, job: GenerationJob, to_images: Callable[[torch.Tensor], list]):
        super().__init__(job)
        self._to_images = to_images

    @property
    def progress(self) -> tuple[int, int]:
        return self._job.steps_done, self._job.steps

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompts as the LLM reads them (the template, without the image tag the sampler drops)."""
        return sum(len(ids) - 1 for ids in self._job.prompt_ids)

    def wait(self, timeout: float | None = None, on_step: Callable[[int, int], None] | None = None) -> None:
        """Until the request is done; `on_step(done, total)` runs here, on the caller's thread."""
        job, seen = self._job, 0
        target = (lambda: job.images is not None) if job.decode else (lambda: job.latents is not None)
        deadline = wait_deadline(timeout)
        job.watch_progress = on_step is not None
        while True:
            with job.waiting():
                job.wait_for(lambda: target() or (on_step is not None and job.steps_done > seen), deadline)
                done_steps, ready = job.steps_done, target()
            if on_step is not None:
                for k in range(seen + 1, done_steps + 1):
                    on_step(k, job.steps)
            seen = done_steps
            if ready:
                return

    def previews_since(self, start: int) -> tuple[list[Preview], bool]:
        """Without blocking: the previews from index `start` on (in the order they were decoded) and
        whether no more will come (the request has ended; a failed one raises its error once its
        previews are read). For a caller woken by `add_listener` rather than blocked in a wait."""
        job = self._job
        with job.waiting():
            job._end_if_overdue(time.monotonic())
            items, over = job.preview_images[start:], job.finished
            if over and job.error is not None and not items:
                raise job.error
        return [self._preview(item) for item in items], over

    def previews(self, timeout: float | None = None) -> Iterator[Preview]:
        """The previews as they are decoded, until the request ends (then `result()` returns at once);
        closing the iterator early does not cancel the request."""
        job, read = self._job, 0
        deadline = wait_deadline(timeout)
        while True:
            with job.waiting():
                job.wait_for(lambda: len(job.preview_images) > read, deadline)
                items = job.preview_images[read:]
            read += len(items)
            if not items:
                return
            for item in items:
                yield self._preview(item)

    def _preview(self, item: tuple[int, int, torch.Tensor]) -> Preview:
        image, index, picture = item
        return Preview(index, self._to_images(picture[None])[0], image)

    def latents(self, timeout: float | None = None, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        self.wait(timeout, on_step)
        if self._job.latents is None:  # `wait` returns once they are set, or raises the request's error
            raise RuntimeFailure("generation: the request ended without latents")
        return self._job.latents

    def result(self, timeout: float | None = None, on_step: Callable[[int, int], None] | None = None) -> list:
        """The PIL images, in prompt order (`n` per prompt)."""
        if not self._job.decode:
            raise ValueError("this request was submitted for latents only: use latents()")
        self.wait(timeout, on_step)
        if self._job.images is None:  # `wait` returns once they are set, or raises the request's error
            raise RuntimeFailure("generation: the request ended without images")
        return self._to_images(self._job.images)


class ChatHandle(_Handle[ChatJob]):
    """A submitted question: iterate it for token ids as they are decoded (EOS is not yielded).

    A request for n answers holds n rows; this handle reads the first, `choice(i)` the i-th."""

    def __init__(self, job: ChatJob, tokenizer, prompt_tokens: int, row: int = 0, owner: "ChatHandle | None" = None):
        if owner is None:
            super().__init__(job)
        else:  # a view of another row: dropping it must not cancel the request, which its owner does
            self._job, self._owner = job, owner
        self._row = job.chat_rows[row]
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens

    @property
    def n(self) -> int:
        """Answers (rows) of the request."""
        return self._job.rows

    def choice(self, i: int) -> "ChatHandle":
        """The handle of answer i (row i, seeded seed + i); it keeps this one, and so the request, alive."""
        return ChatHandle(self._job, self.tokenizer, self.prompt_tokens, check_index(i, self.n, "choice"), self)

    def stop(self) -> None:
        """End this answer where it is (the others go on): what the caller has read is its answer."""
        self._job.end_row(self._row)

    @property
    def top_logprobs(self) -> int | None:
        """Alternatives kept per token (`submit_chat`'s top_logprobs); None: no log-probabilities kept."""
        return self._job.top_logprobs

    def logprobs(self, i: int) -> TokenLogprobs:
        """The i-th token's log-probability and alternatives; for requests submitted with `top_logprobs`,
        for tokens already read (`tokens_since`, iteration)."""
        if self._job.top_logprobs is None:
            raise RequestError("logprobs: this request was submitted without top_logprobs: no log-probabilities "
                               "were kept")
        with self._job.cond:  # the tokens decoded so far
            return self._row.logprobs[check_index(i, len(self._row.logprobs), "logprobs")]

    @property
    def token_ids(self) -> list[int]:
        return [t for t in self._row.tokens if t != self._job.rule.eos_id]

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._row.finish_reason

    def tokens_since(self, start: int) -> tuple[list[int], bool]:
        """Without blocking: the ids decoded from index `start` on (EOS not included) and whether
        the answer is over after them. What iterating yields, in pieces: a failed request's error
        is raised once its tokens are read, and its deadline is enforced here too. For a caller
        woken by `add_listener` rather than blocked in a wait."""
        job, row, eos = self._job, self._row, self._job.rule.eos_id
        with job.waiting():
            job._end_if_overdue(time.monotonic())
            tokens = row.tokens[start:]
            if eos in tokens:
                return tokens[:tokens.index(eos)], True
            if row.finish_reason is not None:  # its limit, or ended by `stop`, while other rows go on
                return tokens, True
            if not job.finished:
                return tokens, False
            if job.error is not None and not tokens:
                raise job.error
            return tokens, job.error is None

    def __iter__(self) -> Iterator[int]:
        job, row, eos = self._job, self._row, self._job.rule.eos_id
        i = 0
        while True:
            with job.waiting():
                job.wait_for(lambda: len(row.tokens) > i or row.finish_reason is not None)
                if len(row.tokens) <= i:
                    return
                token = row.tokens[i]
            i += 1
            if token == eos:
                return
            yield token

    def text(self, timeout: float | None = None) -> str:
        job, row, deadline = self._job, self._row, wait_deadline(timeout)
        with job.waiting():
            job.wait_for(lambda: row.finish_reason is not None, deadline)  # until it ends; raises its error if it failed
        return self.tokenizer.decode(self.token_ids)
