"""POST /v1/images/generations: text-to-image, PNGs as base64 JSON.

No thread waits for the images: the handle's done callback resolves a future on the event loop
(`bridge.when_done`); submitting and PNG encoding run on the service's bounded pool.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .bridge import when_done
from .chat import POLL_S
from .errors import bad_request, shown
from .images import png_base64
from .openai_schema import ImageGenerationRequest
from .service import Service, left


async def image_generation(request: Request, body: ImageGenerationRequest, service: Service) -> Response:
    service.check_model(body.model)
    runtime = service.admit()
    side = runtime.image_size
    if body.size not in (None, f"{side}x{side}"):
        raise bad_request("size", f"this model generates {side}x{side} images only, not {shown(body.size)}")
    deadline = service.deadline()
    handle = await service.blocking(lambda: runtime.submit_generate(
        body.prompt, n=body.n, steps=body.steps, cfg=body.cfg_scale, seed=body.seed or 0,
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
    # The request has ended: result() returns at once (or raises its error); the PNGs take a moment.
    images = await service.blocking(lambda: [png_base64(image) for image in handle.result(timeout=0)], deadline)
    service.metrics.images.inc(len(images))
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b64} for b64 in images]})
