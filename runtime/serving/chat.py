"""POST /v1/chat/completions: a conversation about one image, answered whole or streamed as server-sent events.

No thread waits for the answer: the handle's token listener wakes the request's coroutine
(`bridge.TokenFeed`); decoding the image and submitting run on the service's bounded pool.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import AsyncIterator

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
    # The scheduler's timeout is what is left of the request's: preparing it counted too.
    handle = await service.blocking(lambda: runtime.submit_chat(
        question.image, question.text, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        seed=body.seed or 0, timeout=left(deadline), system_prompt=question.system_prompt,
        history=question.history, image_turn=question.image_turn), deadline)
    service.track(handle)
    request.state.rows = 1
    answer = _Answer(request, service, handle, TextStream(runtime.tokenizer, body.stop or []), start)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(answer.events(include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text = "".join([delta async for delta in answer.deltas()])
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse({
        "id": answer.id, "object": "chat.completion", "created": answer.created, "model": service.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": answer.finish_reason}],
        "usage": answer.usage(),
    })


class _Answer:
    """One request's answer: token ids from the scheduler turned into text, stopped and cancelled as needed."""

    def __init__(self, request: Request, service: Service, handle, text: TextStream, start: float):
        self.request = request
        self.service = service
        self.handle = handle
        self.text = text
        self.start = start
        self.id = f"chatcmpl-{request.state.request_id}"
        self.created = int(time.time())
        self.finish_reason: str | None = None

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas until EOS, the token limit or a stop sequence; the handle is cancelled on any early exit."""
        feed = TokenFeed(self.handle)
        metrics = self.service.metrics
        try:
            while True:
                try:
                    token = await feed.next(POLL_S)
                except TimeoutError:
                    if await self.request.is_disconnected():
                        raise ClientGone from None
                    continue
                if token is None:
                    self.finish_reason = self.handle.finish_reason or "stop"
                    if tail := self.text.finish():
                        yield tail
                    return
                if self.text.completion_tokens == 0:
                    metrics.ttft.observe(time.perf_counter() - self.start)
                delta = self.text.push(token)
                metrics.tokens.labels("completion").inc()
                if delta:
                    yield delta
                if self.text.stopped:
                    self.finish_reason = "stop"
                    return
        finally:
            feed.close()
            if self.finish_reason is None or self.text.stopped:
                self.handle.cancel()
            metrics.tokens.labels("prompt").inc(self.prompt_tokens)

    @property
    def prompt_tokens(self) -> int:
        return self.handle.prompt_tokens

    def usage(self) -> dict:
        n = self.text.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        return _event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.service.model_id,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """OpenAI's chunk events, ending with `[DONE]`; an error after the 200 goes in an error event."""
        yield self._chunk({"role": "assistant", "content": ""})
        try:
            async for delta in self.deltas():
                yield self._chunk({"content": delta})
        except ClientGone:
            return
        except Exception as e:
            error = api_error_from(e)
            self.service.count_error(error)
            yield _event(error.body())
            yield "data: [DONE]\n\n"
            return
        yield self._chunk({}, self.finish_reason)
        if include_usage:
            yield _event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                          "model": self.service.model_id, "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
