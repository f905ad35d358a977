"""Every setting of a serving process in one typed object, each defaulting to `jfexport.defaults`.

`jfexport serve` and the Ray Serve app build one from their options (`from_options`) and hand it
down: the server, the app, the middleware, the connection guard and the runtime's loader read
their settings from it, so that no default is written twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from jfexport import defaults

MIB = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    # what is served
    model_id: str = defaults.MODEL_NAME
    api_key: str | None = None  # None: the /v1 routes are open
    backend: str = "auto"
    precision: str | None = None  # None: the build's best
    # the scheduler
    max_queue: int = defaults.MAX_QUEUE  # requests waiting for admission; 429 past it
    # a request
    request_timeout: float | None = defaults.REQUEST_TIMEOUT_S  # seconds, queueing included; None: none
    default_max_tokens: int = defaults.MAX_NEW_TOKENS
    max_body_bytes: int = int(defaults.MAX_BODY_MB * MIB)
    max_image_bytes: int = int(defaults.MAX_IMAGE_MB * MIB)  # of the encoded image in a data: URL
    max_image_pixels: int = defaults.MAX_IMAGE_PIXELS
    blocking_threads: int = defaults.BLOCKING_THREADS
    # slow or many clients: seconds for a request's headers to arrive (from the connection's first
    # byte, or from the end of the previous answer on a kept-alive one) and for its whole body
    header_timeout: float = defaults.HEADER_TIMEOUT_S
    body_timeout: float = defaults.BODY_TIMEOUT_S
    send_timeout: float = defaults.SEND_TIMEOUT_S  # seconds an answer waits on a client that reads none of it
    max_header_bytes: int = defaults.MAX_HEADER_KB << 10
    max_connections: int = defaults.MAX_CONNECTIONS
    # stopping: seconds in-flight requests get after SIGTERM
    grace: float = defaults.GRACE_S

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "ServeSettings":
        """From the options of `jfexport serve` or the Ray app's args (sizes in MB, `model` for the id);
        an option absent or None keeps its default. A number that is not finite and > 0 is a
        ValueError naming the option."""
        given = {k: v for k, v in options.items() if k in SETTINGS_OPTIONS and v is not None}
        for key in ("request_timeout", "max_body_mb", "max_image_mb", "header_timeout", "body_timeout",
                    "send_timeout"):
            if key in given:
                given[key] = _positive(key, given[key])
        for key in ("max_queue", "max_connections"):
            if key in given:
                given[key] = positive_int(key, given[key])
        if "grace" in given:
            given["grace"] = at_least_zero("grace", given["grace"])
            if given["grace"] > defaults.MAX_GRACE_S:
                raise ValueError(f"grace: must be at most {defaults.MAX_GRACE_S:g} s, got {options['grace']!r}")
        if "model" in given:
            given["model_id"] = str(given.pop("model"))
            if not given["model_id"].strip():
                raise ValueError("model: the model id is empty")
        for key, field in (("max_body_mb", "max_body_bytes"), ("max_image_mb", "max_image_bytes")):
            if key in given:
                given[field] = int(given.pop(key) * MIB)
                if given[field] < 1:
                    raise ValueError(f"{key}: {options[key]!r} MB is less than a byte")
        if "backend" in given and given["backend"] not in defaults.ENGINE_BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(defaults.ENGINE_BACKENDS)}, got {given['backend']!r}")
        if "precision" in given and given["precision"] not in defaults.ENGINE_PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(defaults.ENGINE_PRECISIONS)}, "
                             f"got {given['precision']!r}")
        if "api_key" in given:
            check_api_key(given["api_key"], "api_key")
        return cls(**given)


def check_api_key(key: object, source: str) -> str:
    """The key as given, refused when it could not protect anything as its operator meant: empty (a
    bare `Bearer ` would pass), or with whitespace around it (a client's token is compared stripped,
    so no client could ever send it: every request would be 401)."""
    text = str(key)
    if not text.strip():
        raise ValueError(f"{source} is empty: give a key, or leave it unset to serve without one")
    if text != text.strip():
        raise ValueError(f"{source} has whitespace around it, which no client's token can match: remove it")
    return text


def _number(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{key}: must be a finite number, got {value!r}")
    return number


def _positive(key: str, value: Any) -> float:
    number = _number(key, value)
    if number <= 0:
        raise ValueError(f"{key}: must be a finite number > 0, got {value!r}")
    return number


def at_least_zero(key: str, value: Any) -> float:
    number = _number(key, value)
    if number < 0:
        raise ValueError(f"{key}: must be a finite number >= 0, got {value!r}")
    return number


def positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not float(_number(key, value)).is_integer() or int(float(value)) < 1:
        raise ValueError(f"{key}: must be a whole number >= 1, got {value!r}")
    return int(float(value))


# The options `from_options` reads: the settings' fields, and the sizes in MB and `model` it converts.
SETTINGS_OPTIONS = frozenset({f.name for f in fields(ServeSettings)} | {"max_body_mb", "max_image_mb", "model"})
