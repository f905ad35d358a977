"""OpenAI-style API errors and the mapping from runtime errors to HTTP statuses."""

from __future__ import annotations

import json
import math

from jfexport.runtime.errors import Overloaded, RequestCancelled, RequestTimeout, SchedulerStopped

from jfexport.core.errors import RuntimeFailure, UserError


class APIError(Exception):
    """An error answered as OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> bytes:
        """The body as JSON in ASCII: a message may quote the client's text, lone surrogates included,
        which UTF-8 cannot encode (they stay escaped: the answer is still valid JSON)."""
        return json.dumps(self.body(), ensure_ascii=True).encode("ascii")

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


def shown(value: object, limit: int = 40) -> str:
    """A client's value quoted in an error message: ASCII-escaped and cut to `limit` characters."""
    text = ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


def bad_request(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def api_error_from(exc: BaseException) -> APIError:
    """The status a runtime error deserves; anything unexpected is a bug (500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, Overloaded):
        return APIError(429, f"the scheduler is full: {exc}", "rate_limit_error", code="overloaded",
                        retry_after=exc.retry_after)
    if isinstance(exc, RequestTimeout):
        return APIError(504, f"the request timed out ({exc})", "timeout_error", code="timeout")
    if isinstance(exc, (SchedulerStopped, RequestCancelled)):
        return APIError(503, f"the server is shutting down ({exc}); retry on another replica", "server_error",
                        code="unavailable", retry_after=1)
    if isinstance(exc, UserError):
        return APIError(400, str(exc))
    if isinstance(exc, RuntimeFailure):
        return APIError(500, f"the runtime failed: {exc}", "server_error", code="runtime_failure")
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error")
