"""POST /v1/images/generations: text-to-image, PNG, JPEG or WebP images as base64 JSON, with OpenAI's usage.

No thread waits for the images: the handle's done callback resolves a future on the event loop
(`bridge.when_done`); submitting and image encoding run on the service's bounded pool.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .bridge import when_done
from .chat import POLL_S
from .errors import bad_request, shown
from .images import encoded_base64
from .openai_schema import ImageGenerationRequest
from .service import Service, left


async def image_generation(request: Request, body: ImageGenerationRequest, service: Service) -> Response:
    service.check_model(body.model)
    runtime = service.admit()
    side = runtime.image_size
    if body.size not in (None, "auto", f"{side}x{side}"):
        raise bad_request("size", f"this model generates {side}x{side} images only, not {shown(body.size)}")
    deadline = service.deadline()
    handle = await service.blocking(lambda: runtime.submit_generate(
        body.prompt, n=body.n, steps=body.sampler_steps(), cfg=body.cfg_scale, seed=body.seed or 0,
        timeout=left(deadline)), deadline)
    service.track(handle)
    request.state.rows = body.n
    done = when_done(handle)
    try:
        # Wake every POLL_S to notice a client that left, and a deadline the worker is too busy to enforce.
        while not (await asyncio.wait({done}, timeout=POLL_S))[0] and not handle.poll():
            if await request.is_disconnected():
                return Response(status_code=499)
    finally:
        if not handle.done():  # the client left, or the server is stopping
            handle.cancel()
    # The request has ended: result() returns at once (or raises its error); encoding takes a moment.
    fmt, compression = body.output_format, body.compression()
    images = await service.blocking(lambda: [encoded_base64(image, fmt, compression)
                                             for image in handle.result(timeout=0)], deadline)
    service.metrics.images.inc(len(images))
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b64} for b64 in images],
                         "background": "opaque", "output_format": fmt, "size": f"{side}x{side}",
                         "usage": usage(handle.prompt_tokens, runtime.grid**2 * len(images))})


def usage(prompt_tokens: int, image_tokens: int) -> dict:
    """OpenAI's images usage: the prompt's text tokens in, the latent tokens the model generated out
    (grid x grid per image; no image is read, so no input image tokens)."""
    return {"input_tokens": prompt_tokens, "output_tokens": image_tokens, "total_tokens": prompt_tokens + image_tokens,
            "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0}}
