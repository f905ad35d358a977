"""POST /v1/images/generations: text-to-image, PNGs as base64 JSON."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .chat import POLL_S
from .errors import bad_request
from .images import png_base64
from .openai_schema import ImageGenerationRequest
from .service import Service
from .threads import in_thread


async def image_generation(request: Request, body: ImageGenerationRequest, service: Service) -> Response:
    service.check_model(body.model)
    runtime = service.admit()
    side = runtime.image_size
    if body.size not in (None, f"{side}x{side}"):
        raise bad_request("size", f"this model generates {side}x{side} images only, not {body.size}")
    handle = await in_thread(lambda: runtime.submit_generate(
        body.prompt, n=body.n, steps=body.steps, cfg=body.cfg_scale, seed=body.seed or 0,
        timeout=service.limits.request_timeout))
    request.state.rows = body.n
    result = in_thread(handle.result)
    try:
        while not (await asyncio.wait({result}, timeout=POLL_S))[0]:
            if await request.is_disconnected():
                return Response(status_code=499)
    finally:
        if not result.done():  # the client left, or the server is stopping
            handle.cancel()
            result.add_done_callback(lambda f: f.exception())  # the RequestCancelled nobody awaits
    images = await result
    service.metrics.images.inc(len(images))
    data = await in_thread(lambda: [{"b64_json": png_base64(image)} for image in images])
    return JSONResponse({"created": int(time.time()), "data": data})
