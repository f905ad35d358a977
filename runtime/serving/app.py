"""The FastAPI app: OpenAI routes, health/readiness, metrics, and errors as OpenAI's error JSON."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from jfexport.core.errors import JanusFlowError

from .chat import chat_completion
from .errors import APIError, api_error_from
from .image_gen import image_generation
from .middleware import ServingMiddleware
from .openai_schema import ChatCompletionRequest, ImageGenerationRequest, validation_error
from .service import Service
from .settings import ServeSettings


def build_app(runtime=None, settings: ServeSettings = ServeSettings(), replica_id: str | None = None) -> FastAPI:
    """The server's ASGI app over `runtime` (a JanusFlowRuntime; attach one later via `app.state.service`).

    With `settings.api_key`, the /v1 routes need `Authorization: Bearer <api_key>`; /health, /ready
    and /metrics stay open for probes and scrapers.
    """
    service = Service(settings, replica_id)
    api_key = settings.api_key
    if runtime is not None:
        service.attach(runtime)
    app = FastAPI(title="jfexport", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error_response(error: APIError) -> Response:
        service.count_error(error)
        return Response(error.json(), status_code=error.status, headers=error.headers(), media_type="application/json")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(JanusFlowError)
    async def _runtime_error(request: Request, exc: JanusFlowError):
        return error_response(api_error_from(exc))

    async def authorized(request: Request) -> None:  # async: a sync dependency would take a pool thread per request
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.post("/chat/completions")
    async def _chat(request: Request, body: ChatCompletionRequest):
        return await chat_completion(request, body, service)

    @v1.post("/images/generations")
    async def _images(request: Request, body: ImageGenerationRequest):
        return await image_generation(request, body, service)

    @v1.get("/models")
    async def _models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                            "owned_by": "jfexport"}]}

    app.include_router(v1)

    @app.get("/health")
    async def _health():
        return {"status": "ok"}

    @app.get("/ready")
    async def _ready():
        if not service.ready:
            why = "draining" if service.draining else "loading"
            return JSONResponse({"status": why}, status_code=503, headers={"Retry-After": "1"})
        return {"status": "ready", "model": service.model_id}

    @app.get("/metrics")
    async def _metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(ServingMiddleware, service=service)
    return app
