"""Request bodies of the OpenAI routes (pydantic), and how validation errors name the field.

Unknown fields are refused, as OpenAI does, so that a misspelt extension field (`cfg` for
`cfg_scale`) is an error rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jfexport.core.processor.request_checks import MAX_IMAGES_PER_PROMPT, MIN_TEMPERATURE

from .errors import APIError, shown

# Bounds checked before any work: a request past them costs its parsing only. Far past what the
# model's context holds (a turn costs several tokens; a token is a few characters), so a real
# conversation never meets them.
MAX_MESSAGES = 1000
MAX_PARTS = 64  # content parts in one message
MAX_TEXT_CHARS = 1 << 18  # a prompt, and all text of a conversation together
MAX_STOPS = 4
MAX_STOP_CHARS = 256

SEED = Field(None, ge=0, lt=2**63, description="Random seed; the same seed gives the same result (default 0).")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Greedy by default (OpenAI's default is 1.0): the bundled models answer best greedily.
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    seed: int | None = SEED
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"up to {MAX_STOPS} non-empty stop sequences of at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {v}")
        return v


class ImageGenerationRequest(_Body):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_PROMPT)  # the runtime's bound: any n it takes, in as many calls as needed
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    user: str | None = None
    # Extensions (not in OpenAI's API): the sampler's settings.
    steps: int = Field(30, ge=1, le=1000, description="Euler steps of the rectified-flow sampler.")
    cfg_scale: float = Field(2.0, ge=0.0, le=100.0, description="Classifier-free guidance weight (1 = none).")
    seed: int | None = SEED


def param_name(loc: tuple) -> str:
    """('body', 'messages', 0, 'content', 'list[...]', 0, 'image_url', 'image_url', 'url') -> 'messages[0].content[0].image_url.url'."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    name = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            name += f"[{part}]"
            continue
        # pydantic names the union member it tried ('str', 'list[...]', a tag repeated before the field).
        if part in _UNION_LABELS or "[" in part or (i + 1 < len(parts) and parts[i + 1] == part and isinstance(parts[i - 1], int)):
            continue
        name += f".{part}" if name else part
    return name or "body"


_UNION_LABELS = {"str", "int", "float", "bool", "none"}


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic/FastAPI validation error as a 400 naming its field."""
    # The deepest is the most specific; at one depth, in a union, the member of the right type tells
    # what is wrong (a list of too many parts, not "should be a valid string").
    first = max(errors, key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")))
    param = param_name(tuple(first.get("loc", ())))
    if not (param.isascii() and param.isprintable() and len(param) <= 80):  # an unknown field's name is the client's
        param = shown(param, 80)
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({(first.get('ctx') or {}).get('error', first.get('msg'))})",
                        param="body")
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}", param=param)
