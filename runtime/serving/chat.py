"""POST /v1/chat/completions: a conversation about one image, answered whole or streamed as server-sent events.

No thread waits for the answer: the handle's token listener wakes the request's coroutine
(`bridge.TokenFeed`); decoding the image and submitting run on the service's bounded pool.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import AsyncIterator

from jfexport.runtime.errors import RequestCancelled
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jfexport.core.errors import InputError
from jfexport.core.processor.request_checks import check_text

from .bridge import TokenFeed
from .detokenize import TextStream
from .errors import APIError, api_error_from, bad_request
from .images import decode_data_url
from .openai_schema import MAX_TEXT_CHARS, ChatCompletionRequest, ChatMessage
from .service import Service, left
from .settings import ServeSettings

POLL_S = 0.05  # how often a waiting request checks that its client is still there
_NO_NEWS = object()


@dataclass
class Question:
    image: Image.Image
    text: str
    system_prompt: str | None = None  # None: the model's default
    history: list[tuple[str, str]] | None = None  # earlier (role, text) turns; None: the question alone
    image_turn: int = 0  # index in history + [question] of the user turn holding the image


SYSTEM_ROLES = ("system", "developer")


def _text_of(message: ChatMessage) -> tuple[list[str], list[tuple[int, str]]]:
    """The text parts of a message's content, and its image parts as (part index, url)."""
    content = message.content
    parts = [] if content is None else [content] if isinstance(content, str) else content
    texts, images = [], []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
        elif part.type == "text":
            texts.append(part.text)
        else:
            images.append((j, part.image_url.url))
    return texts, images


def check_text_size(messages: list[ChatMessage]) -> None:
    """413 when the conversation's text together is over MAX_TEXT_CHARS: before it costs a tokenizer pass."""
    total = sum(len(c) if isinstance(c := m.content, str) else
                sum(len(p.text) for p in c if p.type == "text") if c else 0 for m in messages)
    if total > MAX_TEXT_CHARS:
        raise APIError(413, f"messages: {total} characters of text, at most {MAX_TEXT_CHARS} are accepted",
                       param="messages", code="text_too_large")


def _plain(param: str, text: str) -> str:
    try:
        return check_text(param, text)
    except InputError as e:
        raise bad_request(param, str(e).removeprefix(f"{param}: ")) from None


def read_question(messages: list[ChatMessage], settings: ServeSettings) -> Question:
    """An optional leading system (or developer) message, then the conversation: user,
    assistant, user, ..., user; the last user message is the question.

    The system message replaces the model's default system prompt for this request (text only).
    Earlier turns become the runtime's `history`, in the official JanusFlow multi-turn format;
    assistant messages hold text only. Exactly one image, in any user message, as the runtime
    answers about one image per conversation. Roles out of that order (two user messages in a
    row, a conversation ending with an assistant message, tool messages) are refused, naming the
    message, rather than reordered or dropped.
    """
    system_prompt, first = None, 0
    if messages and messages[0].role in SYSTEM_ROLES:
        texts, images = _text_of(messages[0])
        if images:
            raise bad_request(f"messages[0].content[{images[0][0]}]",
                              f"a {messages[0].role} message holds text only; send the image in the user message")
        system_prompt, first = _plain("messages[0].content", "\n".join(texts)), 1
    if len(messages) == first:
        raise bad_request("messages", "a user message with the question and one image is needed")
    turns: list[tuple[str, str]] = []
    image: tuple[int, int, str] | None = None  # (message index, part index, url)
    for i, message in enumerate(messages[first:], first):
        want = "user" if (i - first) % 2 == 0 else "assistant"
        if message.role in SYSTEM_ROLES:
            raise bad_request(f"messages[{i}]", f"only one {message.role} message is supported, as the first message")
        if message.role not in ("user", "assistant"):
            raise bad_request(f"messages[{i}]", f"{message.role} messages are not supported: the conversation is "
                                                "user and assistant messages, alternating")
        if message.role != want:
            raise bad_request(f"messages[{i}]", f"expected {'a user' if want == 'user' else 'an assistant'} message "
                                                f"here, got {message.role}: after an optional system message, user "
                                                "and assistant messages alternate, starting and ending with user")
        texts, images = _text_of(message)
        if images and message.role == "assistant":
            raise bad_request(f"messages[{i}].content[{images[0][0]}]",
                              "an assistant message holds text only; send the image in a user message")
        for j, url in images:
            if image is not None:
                raise bad_request(f"messages[{i}].content[{j}]",
                                  f"a second image (the first is messages[{image[0]}].content[{image[1]}]): the model "
                                  "answers about exactly one image per conversation")
            image = (i, j, url)
        text = _plain(f"messages[{i}].content", "\n".join(texts))
        # An empty turn has no official rendering (the template glues the next turn to it); the
        # user message holding the image may be the image alone, unless it is the question.
        if not text.strip() and not (images and i < len(messages) - 1):
            what = "the question (text part)" if i == len(messages) - 1 else f"the {message.role} message's text"
            raise bad_request(f"messages[{i}].content", f"{what} is empty")
        turns.append((message.role, text))
    last = len(messages) - 1
    if messages[last].role != "user":
        raise bad_request(f"messages[{last}]", "the conversation must end with a user message (the question)")
    if image is None:
        raise bad_request(f"messages[{first}].content",
                          "exactly one image_url part is needed (in a user message, usually the first), got 0")
    i, j, url = image
    decoded = decode_data_url(url, f"messages[{i}].content[{j}].image_url.url", settings.max_image_bytes,
                              settings.max_image_pixels)
    history = turns[:-1] or None
    return Question(decoded, turns[-1][1], system_prompt, history, i - first)


class ClientGone(Exception):
    """The client disconnected: its request is cancelled and nobody is left to answer."""


async def chat_completion(request: Request, body: ChatCompletionRequest, service: Service) -> Response:
    start = time.perf_counter()
    service.check_model(body.model)
    check_text_size(body.messages)
    deadline = service.deadline()
    question = await service.blocking(lambda: read_question(body.messages, service.settings), deadline)
    runtime = service.admit()
    max_tokens = body.max_completion_tokens or body.max_tokens or service.settings.default_max_tokens
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    # The scheduler's timeout is what is left of the request's: preparing it counted too.
    handle = await service.blocking(lambda: runtime.submit_chat(
        question.image, question.text, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        seed=body.seed or 0, timeout=left(deadline), system_prompt=question.system_prompt,
        history=question.history, image_turn=question.image_turn, n=body.n, top_logprobs=top_logprobs), deadline)
    service.track(handle)
    request.state.rows = body.n
    answer = _Answer(request, service, handle, runtime.tokenizer, body.stop or [], start)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(answer.events(include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        async for _ in answer.deltas():
            pass
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse({
        "id": answer.id, "object": "chat.completion", "created": answer.created, "model": service.model_id,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text.text},
                     "logprobs": c.logprobs(0), "finish_reason": c.finish_reason}
                    for i, c in enumerate(answer.choices)],
        "usage": answer.usage(),
    })


def _token_entry(tokenizer, token: int, logprob: float) -> dict:
    """A token as OpenAI's logprobs show it: its text alone, or `bytes:\\xNN...` where its bytes are
    part of a UTF-8 character (as OpenAI shows such tokens); `bytes` holds them either way."""
    raw = tokenizer.token_bytes(token)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


class _Choice:
    """One answer of a request: its row's handle, its text and what of it has been sent."""

    def __init__(self, handle, text: TextStream):
        self.handle = handle
        self.text = text
        self.finish_reason: str | None = None

    def logprobs(self, since: int) -> dict | None:
        """OpenAI's `logprobs` of tokens [since, read so far), None where the request asked for none."""
        if self.handle.top_logprobs is None:
            return None
        tokenizer = self.handle.tokenizer
        content = []
        for i in range(since, self.text.completion_tokens):
            lp = self.handle.logprobs(i)
            content.append({**_token_entry(tokenizer, lp.token, lp.logprob),
                            "top_logprobs": [_token_entry(tokenizer, t, v) for t, v in lp.top]})
        return {"content": content}


class _Answer:
    """One request's answers: token ids from the scheduler turned into text, stopped and cancelled as needed."""

    def __init__(self, request: Request, service: Service, handle, tokenizer, stop: list[str], start: float):
        self.request = request
        self.service = service
        self.handle = handle
        self.choices = [_Choice(handle.choice(i), TextStream(tokenizer, stop)) for i in range(handle.n)]
        self.start = start
        self.id = f"chatcmpl-{request.state.request_id}"
        self.created = int(time.time())

    async def deltas(self) -> AsyncIterator[tuple[int, str]]:
        """(answer, text delta) until every answer has ended at EOS, its token limit or a stop sequence
        (a delta, maybe empty, where an answer ends); the request is cancelled on any early exit."""
        feed = TokenFeed([c.handle for c in self.choices])
        metrics = self.service.metrics
        first, ended = True, False
        checked = time.monotonic()
        try:
            while True:
                try:
                    news = await feed.next(POLL_S)
                except TimeoutError:
                    news = _NO_NEWS
                except RequestCancelled as e:
                    raise self.service.answer_for(e) from None
                # Checked on a clock, not only when tokens pause: an answer whose tokens keep coming
                # would otherwise run to its end for a client that left.
                if time.monotonic() - checked >= POLL_S:
                    checked = time.monotonic()
                    if await self.request.is_disconnected():
                        raise ClientGone
                if news is _NO_NEWS:
                    continue
                if news is None:
                    ended = True
                    return
                i, token = news
                choice = self.choices[i]
                if choice.finish_reason is not None:  # stopped by a stop sequence: its row's last tokens
                    continue
                if token is None:
                    choice.finish_reason = choice.handle.finish_reason or "stop"
                    yield i, choice.text.finish()
                    continue
                if first:
                    metrics.ttft.observe(time.perf_counter() - self.start)
                    first = False
                delta = choice.text.push(token)
                metrics.tokens.labels("completion").inc()
                if choice.text.stopped:
                    choice.finish_reason = "stop"
                    choice.handle.stop()  # the other answers go on
                    yield i, delta
                elif delta:
                    yield i, delta
        finally:
            feed.close()
            if not ended:
                self.handle.cancel()
            metrics.tokens.labels("prompt").inc(self.prompt_tokens)

    @property
    def prompt_tokens(self) -> int:
        return self.handle.prompt_tokens

    def usage(self) -> dict:
        # As OpenAI counts n answers: the prompt once, every answer's tokens.
        n = sum(c.text.completion_tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _chunk(self, index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> str:
        return _event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.service.model_id,
                       "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                    "finish_reason": finish_reason}]})

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """OpenAI's chunk events, each answer's with its `index`, ending with `[DONE]`; an error after
        the 200 goes in an error event."""
        for i in range(len(self.choices)):
            yield self._chunk(i, {"role": "assistant", "content": ""})
        reported = [0] * len(self.choices)  # tokens whose logprobs were sent, per answer
        try:
            async for i, delta in self.deltas():
                choice = self.choices[i]
                # A token's logprobs go out with the first text it makes safe to send (or at its answer's end).
                unreported = choice.handle.top_logprobs is not None and choice.text.completion_tokens > reported[i]
                if delta or (choice.finish_reason is not None and unreported):
                    yield self._chunk(i, {"content": delta}, choice.logprobs(reported[i]))
                    reported[i] = choice.text.completion_tokens
                if choice.finish_reason is not None:
                    yield self._chunk(i, {}, finish_reason=choice.finish_reason)
        except ClientGone:
            return
        except Exception as e:
            error = api_error_from(e)
            self.service.count_error(error)
            yield _event(error.body())
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            yield _event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                          "model": self.service.model_id, "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
