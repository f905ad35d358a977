"""Checks of request inputs, shared by the reference pipelines and the runtime.

Every check raises a RequestError (an InputError and a ValueError) whose message starts with the
parameter's name, so a service can return it to the caller as is. Pure Python: nothing here
touches a model, so the serving path can validate a request before it reaches the engines.

Accepted ranges (inclusive unless stated):

| parameter | accepted |
|---|---|
| text (prompt, question) | `str` encodable as UTF-8 (no lone surrogates); bytes are refused, decode them first |
| `temperature` | 0 (greedy) or a finite real >= MIN_TEMPERATURE |
| `top_p` | finite real in (0, 1] |
| `seed` | int in 0 .. 2**63 - 1 (fits every torch/numpy generator; torch itself takes [-2**63, 2**64 - 1]) |
| `max_new_tokens` | int in 0 .. MAX_NEW_TOKENS |
| `n` | int in 1 .. MAX_IMAGES_PER_PROMPT |
| `steps` | int in 1 .. MAX_STEPS |
| `cfg` | finite real in 0 .. MAX_CFG |

`bool` is refused wherever a number is expected: `True` as a seed or a token count is a caller's bug.
"""

from __future__ import annotations

import math
import operator
from numbers import Real
from typing import SupportsIndex, cast

from jfexport.core.processor.errors import ProcessorInputError, RequestError

MAX_SEED = 2**63 - 1
# Logits are divided by the temperature in float32: far below this the quotient overflows to inf
# and the softmax gives NaN probabilities. Sampling this cold is greedy decoding in all but name.
MIN_TEMPERATURE = 1e-5
# Four times JanusFlow-1.3B's 16384-position context: a longer answer cannot be decoded anyway,
# and a runtime sizes its KV cache from this number.
MAX_NEW_TOKENS = 65536
MAX_IMAGES_PER_PROMPT = 64
# The official demo uses 30 Euler steps; 1000 is far past any quality gain and bounds the work.
MAX_STEPS = 1000
# The demo's guidance slider stops at 10; beyond 100 the CFG extrapolation only produces saturated noise.
MAX_CFG = 100.0


def check_text(name: str, value: object) -> str:
    """`value` if it is a str that encodes to UTF-8; the tokenizer cannot take anything else."""
    if not isinstance(value, str):
        raise ProcessorInputError(f"{name}: expected text (str), got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ProcessorInputError(
            f"{name}: not valid Unicode text: character {value[e.start]!r} at position {e.start} is a lone surrogate"
        ) from None
    return value


def _integer(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise RequestError(f"{name}: expected an integer, got a bool ({value})")
    try:
        # int and numpy integers; floats, even integral ones, are refused (TypeError, caught below)
        number = operator.index(cast(SupportsIndex, value))
    except TypeError:
        raise RequestError(f"{name}: expected an integer, got {type(value).__name__} {value!r}") from None
    if not low <= number <= high:
        raise RequestError(f"{name}: {number} is outside the accepted range {low} .. {high}")
    return number


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RequestError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise RequestError(f"{name}: must be a finite number, got {number}")
    return number


def check_seed(seed: object) -> int:
    return _integer("seed", seed, 0, MAX_SEED)


def check_sampling(temperature: object, top_p: object, seed: object, max_new_tokens: object) -> None:
    """Parameters of understanding (text) decoding."""
    t = _real("temperature", temperature)
    if t < 0:
        raise RequestError(f"temperature: must be >= 0 (0 decodes greedily), got {temperature}")
    if 0 < t < MIN_TEMPERATURE:
        raise RequestError(f"temperature: must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature}")
    p = _real("top_p", top_p)
    if not 0 < p <= 1:
        raise RequestError(f"top_p: must be in (0, 1], got {p}")
    check_seed(seed)
    _integer("max_new_tokens", max_new_tokens, 0, MAX_NEW_TOKENS)


def check_generation(n: object, steps: object, cfg: object, seed: object) -> None:
    """Parameters of text-to-image generation."""
    _integer("n", n, 1, MAX_IMAGES_PER_PROMPT)
    _integer("steps", steps, 1, MAX_STEPS)
    weight = _real("cfg", cfg)
    if not 0 <= weight <= MAX_CFG:
        raise RequestError(f"cfg: must be in 0 .. {MAX_CFG:g}, got {weight}")
    check_seed(seed)
