"""POST /v1/images/generations: text-to-image, PNG, JPEG or WebP images as base64 JSON, with OpenAI's usage;
with `stream: true`, server-sent events in OpenAI's format: `partial_images` previews
(`image_generation.partial_image`), then `image_generation.completed` with the image and usage.

No thread waits for the images: the handle's done callback resolves a future on the event loop
(`bridge.when_done`), and a streamed request's previews wake it through the handle's listener
(`bridge.Feed`); submitting and image encoding run on the service's bounded pool. A client that
leaves cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jfexport.core.processor.errors import RequestError
from jfexport.core.processor.request_checks import check_previews

from .bridge import Feed, unread, when_done
from .chat import POLL_S
from .errors import api_error_from, bad_request, shown
from .images import encoded_base64
from .openai_schema import ImageGenerationRequest
from .service import Service, left


async def image_generation(request: Request, body: ImageGenerationRequest, service: Service) -> Response:
    service.check_model(body.model)
    runtime = service.admit()
    side = runtime.image_size
    if body.size not in (None, "auto", f"{side}x{side}"):
        raise bad_request("size", f"this model generates {side}x{side} images only, not {shown(body.size)}")
    steps = body.sampler_steps()
    try:
        previews = check_previews(body.partial_images or 0, steps, "partial_images")
    except RequestError as e:
        raise bad_request("partial_images", str(e).removeprefix("partial_images: ")) from None
    deadline = service.deadline()
    handle = await service.blocking(lambda: runtime.submit_generate(
        body.prompt, n=body.n, steps=steps, cfg=body.cfg_scale, seed=body.seed or 0,
        timeout=left(deadline), previews=previews), deadline)
    service.track(handle)
    request.state.rows = body.n
    common = {"background": "opaque", "output_format": body.output_format, "size": f"{side}x{side}"}
    if body.stream:
        events = _events(request, service, handle, body, deadline, {**common, "quality": body.quality},
                         runtime.grid**2)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done = when_done(handle)
    try:
        # Wake every POLL_S to notice a client that left, and a deadline the worker is too busy to enforce.
        while not (await asyncio.wait({done}, timeout=POLL_S))[0] and not handle.poll():
            if await request.is_disconnected():
                return Response(status_code=499)
    finally:
        if not handle.done():  # the client left, or the server is stopping
            handle.cancel()
    images = await _final_images(service, handle, body, deadline)
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b64} for b64 in images], **common,
                         "usage": usage(handle.prompt_tokens, runtime.grid**2 * len(images))})


async def _final_images(service: Service, handle, body: ImageGenerationRequest, deadline: float | None) -> list[str]:
    """The ended request's images, encoded: result() returns at once (or raises its error)."""
    if (error := handle.exception()) is not None:  # its own error (a timeout names what ran out), not the pool's
        raise service.answer_for(error)
    fmt, compression = body.output_format, body.compression()
    images = await service.blocking(lambda: [encoded_base64(image, fmt, compression)
                                             for image in handle.result(timeout=0)], deadline)
    service.metrics.images.inc(len(images))
    return images


async def _events(request: Request, service: Service, handle, body: ImageGenerationRequest, deadline: float | None,
                  common: dict, image_tokens: int) -> AsyncIterator[str]:
    """The previews as they are decoded, then the image; an error after the 200 goes in an `error`
    event. Any early exit (the client left: the server stops iterating) cancels the request."""
    feed = Feed(handle, unread(handle.previews_since))
    fmt, compression = body.output_format, body.compression()
    try:
        while True:
            try:
                preview = await feed.next(POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if preview is None:
                break
            b64 = await service.blocking(lambda: encoded_base64(preview.picture, fmt, compression), deadline)
            yield _event("image_generation.partial_image", {"b64_json": b64, "created_at": int(time.time()),
                                                            "partial_image_index": preview.index, **common})
        for b64 in await _final_images(service, handle, body, deadline):
            yield _event("image_generation.completed", {"b64_json": b64, "created_at": int(time.time()), **common,
                                                        "usage": usage(handle.prompt_tokens, image_tokens)})
    except Exception as e:
        error = api_error_from(service.answer_for(e))
        service.count_error(error)
        yield f"event: error\ndata: {json.dumps(error.body(), separators=(',', ':'))}\n\n"
    finally:
        feed.close()
        if not handle.done():
            handle.cancel()


def _event(kind: str, payload: dict) -> str:
    """One server-sent event as OpenAI frames its image events: the type as the event name and in the data."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, image_tokens: int) -> dict:
    """OpenAI's images usage: the prompt's text tokens in, the latent tokens the model generated out
    (grid x grid per image; no image is read, so no input image tokens)."""
    return {"input_tokens": prompt_tokens, "output_tokens": image_tokens, "total_tokens": prompt_tokens + image_tokens,
            "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0}}
