"""Request bodies of the OpenAI routes (pydantic), and how validation errors name the field.

Unknown fields are refused, as OpenAI does, so that a misspelt extension field (`cfg` for
`cfg_scale`) is an error rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from jfexport import defaults
from jfexport.core.errors import InputError
from jfexport.core.processor.request_checks import (
    MAX_PREVIEWS,
    check_cfg,
    check_choices,
    check_images_per_prompt,
    check_max_new_tokens,
    check_prompt,
    check_seed,
    check_steps,
    check_temperature,
    check_top_logprobs,
    check_top_p,
)

from .errors import APIError, shown

# Bounds checked before any work: a request past them costs its parsing only. Far past what the
# model's context holds (a turn costs several tokens; a token is a few characters), so a real
# conversation never meets them.
MAX_MESSAGES = 1000
MAX_PARTS = 64  # content parts in one message
MAX_TEXT_CHARS = 1 << 18  # a prompt, and all text of a conversation together
MAX_STOPS = 4
MAX_STOP_CHARS = 256


class Unsupported(ValueError):
    """A value OpenAI's API defines that this server does not serve: a 400 with code `unsupported_value`."""


def checked(check: Callable[[Any, str], Any]) -> BeforeValidator:
    """The field validated by the runtime's own request check (`check(value, name)`), so that the
    HTTP bounds are the runtime's: they are stated once, in request_checks. It sees the value as sent,
    before pydantic's lax coercion, so `true` or `"3"` for a number is refused as the runtime refuses it
    (not read as 1 and 3)."""

    def validate(value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        name = info.field_name or "value"
        try:
            return check(value, name)
        except InputError as e:
            raise ValueError(str(e).removeprefix(f"{name}: ")) from None

    return BeforeValidator(validate)


Seed = Annotated[int | None, checked(check_seed),
                 Field(description="Random seed; the same seed gives the same result (default 0).")]
# An answer of no token is no answer: OpenAI refuses max_tokens 0, and so does this server (the
# runtime takes 0 for a prefill alone).
AnswerTokens = Annotated[int | None, Field(ge=1), checked(check_max_new_tokens)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    # Accepted and ignored: the model has one input resolution (every image is resized to it).
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
    include_usage: StrictBool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: AnswerTokens = None
    max_completion_tokens: AnswerTokens = None
    # Greedy by default (OpenAI's default is 1.0): the bundled models answer best greedily.
    temperature: Annotated[float, checked(check_temperature)] = defaults.TEMPERATURE
    top_p: Annotated[float, checked(check_top_p)] = defaults.TOP_P
    seed: Seed = None
    stop: list[str] | None = None  # OpenAI also takes one string: made a list before validation
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    n: Annotated[int, checked(check_choices)] = 1
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int | None, checked(check_top_logprobs)] = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, v: list[str] | None) -> list[str]:
        stops = v or []
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"up to {MAX_STOPS} non-empty stop sequences of at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.type != "text":
            raise Unsupported(f"only {{\"type\": \"text\"}} is served, not {v.type!r}: this server has no "
                              "grammar-constrained decoding")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true (top_logprobs are the alternatives listed beside each token's logprob)")
        return v


class ImageGenerationRequest(_Body):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), checked(check_prompt)]
    model: str | None = None
    n: Annotated[int, checked(check_images_per_prompt)] = defaults.IMAGES_PER_PROMPT  # any n, in as many calls as needed
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = defaults.OUTPUT_FORMAT
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: Literal["low", "medium", "high", "auto"] = "auto"  # defaults.QUALITY_STEPS' keys
    background: Literal["auto", "opaque", "transparent"] = "auto"
    moderation: Literal["auto", "low"] = "auto"  # accepted: no moderation model runs here
    stream: StrictBool = False
    partial_images: int | None = Field(None, ge=0, le=MAX_PREVIEWS)
    user: str | None = None
    # Extensions (not in OpenAI's API): the sampler's settings.
    steps: Annotated[int | None, checked(check_steps),
                     Field(description="Euler steps of the rectified-flow sampler; default: quality's.")] = None
    cfg_scale: Annotated[float, checked(check_cfg),
                         Field(description="Classifier-free guidance weight (1 = none).")] = defaults.CFG
    seed: Seed = None

    @field_validator("output_compression")
    @classmethod
    def _lossy_formats_only(cls, v, info: ValidationInfo):
        if v not in (None, 100) and info.data.get("output_format") == "png":
            raise Unsupported(f"{v} applies to jpeg and webp: png is lossless (send output_format jpeg or webp)")
        return v

    @field_validator("background")
    @classmethod
    def _opaque(cls, v):
        if v == "transparent":
            raise Unsupported("transparent backgrounds are not generated: the model draws opaque RGB images "
                              "(send auto or opaque)")
        return v

    @field_validator("partial_images")
    @classmethod
    def _streamed_only(cls, v, info: ValidationInfo):
        if v and not info.data.get("stream"):
            raise Unsupported(f"{v} previews need stream: true (they are sent as server-sent events)")
        return v

    @field_validator("stream")
    @classmethod
    def _one_streamed_image(cls, v, info: ValidationInfo):
        if v and info.data.get("n", 1) != 1:
            raise Unsupported(f"a streamed request makes one image (n=1), not {info.data['n']}: OpenAI's stream "
                              "events carry no image index; send one request per image")
        return v

    def sampler_steps(self) -> int:
        """`steps` when given, else the Euler steps of `quality`."""
        return self.steps if self.steps is not None else defaults.QUALITY_STEPS[self.quality]

    def compression(self) -> int:
        return defaults.OUTPUT_COMPRESSION if self.output_compression is None else self.output_compression


def param_name(loc: tuple) -> str:
    """pydantic's error location as a field path: ('body', 'messages', 0, 'content', 'list[...]', 0,
    'image_url', 'image_url', 'url') -> 'messages[0].content[0].image_url.url'."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    name = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            name += f"[{part}]"
            continue
        # pydantic names the union member it tried ('str', 'list[...]', a tag repeated before the field).
        repeated_tag = i + 1 < len(parts) and parts[i + 1] == part and isinstance(parts[i - 1], int)
        if part in _UNION_LABELS or "[" in part or repeated_tag:
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
    unsupported = isinstance((first.get("ctx") or {}).get("error"), Unsupported)
    return APIError(400, f"{param}: {message}", param=param, code="unsupported_value" if unsupported else None)
