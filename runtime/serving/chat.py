"""POST /v1/chat/completions: one question about one image, whole or streamed as server-sent events.

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

from .bridge import TokenFeed
from .detokenize import TextStream
from .errors import api_error_from, bad_request
from .images import decode_data_url
from .openai_schema import ChatCompletionRequest, ChatMessage
from .service import Limits, Service

POLL_S = 0.05  # how often a waiting request checks that its client is still there


@dataclass
class Question:
    image: Image.Image
    text: str
    system_prompt: str | None = None  # None: the model's default


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


def read_question(messages: list[ChatMessage], limits: Limits) -> Question:
    """An optional leading system (or developer) message, then one user message: its text parts
    joined, and exactly one image.

    The system message replaces the model's default system prompt for this request (text only).
    The runtime answers a single question about a single image with the model's own chat
    template, so earlier turns are refused rather than silently dropped.
    """
    system_prompt, first = None, 0
    if messages and messages[0].role in SYSTEM_ROLES:
        texts, images = _text_of(messages[0])
        if images:
            raise bad_request(f"messages[0].content[{images[0][0]}]",
                              f"a {messages[0].role} message holds text only; send the image in the user message")
        system_prompt, first = "\n".join(texts), 1
    for i, message in enumerate(messages[first:], first):
        if message.role in SYSTEM_ROLES:
            raise bad_request(f"messages[{i}]", f"only one {message.role} message is supported, as the first message")
        if message.role != "user":
            raise bad_request(f"messages[{i}]", f"{message.role} messages (earlier turns) are not supported: the model "
                                                "answers one user question about one image, with no conversation")
        if i > first:
            raise bad_request(f"messages[{i}]", "only one user message is supported (a question about one image; "
                                                "the model's chat template has no earlier turns)")
    if len(messages) == first:
        raise bad_request("messages", "a user message with the question and one image is needed")
    u = first
    texts, images = _text_of(messages[u])
    if len(images) != 1:
        raise bad_request(f"messages[{u}].content", f"exactly one image_url part is needed, got {len(images)}")
    text = "\n".join(texts)
    if not text.strip():
        raise bad_request(f"messages[{u}].content", "the question (text part) is empty")
    j, url = images[0]
    image = decode_data_url(url, f"messages[{u}].content[{j}].image_url.url", limits.max_image_bytes,
                            limits.max_image_pixels)
    return Question(image, text, system_prompt)


class ClientGone(Exception):
    """The client disconnected: its request is cancelled and nobody is left to answer."""


async def chat_completion(request: Request, body: ChatCompletionRequest, service: Service) -> Response:
    start = time.perf_counter()
    service.check_model(body.model)
    question = await service.blocking(lambda: read_question(body.messages, service.limits))
    runtime = service.admit()
    max_tokens = body.max_completion_tokens or body.max_tokens or service.limits.default_max_tokens
    handle = await service.blocking(lambda: runtime.submit_chat(
        question.image, question.text, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        seed=body.seed or 0, timeout=service.limits.request_timeout, system_prompt=question.system_prompt))
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
