"""Checks of request inputs, shared by the reference pipelines and the runtime.

Every check raises a RequestError (an InputError and a ValueError) whose message starts with the
parameter's name, so a service can return it to the caller as is. Pure Python: nothing here
touches a model, so the serving path can validate a request before it reaches the engines.

Accepted ranges (inclusive unless stated):

| parameter | accepted |
|---|---|
| text (prompt, question) | `str` encodable as UTF-8 (no lone surrogates); bytes are refused, decode them first |
| `temperature` | 0 (greedy) or a finite real in MIN_TEMPERATURE .. MAX_TEMPERATURE |
| `top_p` | finite real in (0, 1] |
| `seed` | int in 0 .. 2**63 - 1 (fits every torch/numpy generator; torch itself takes [-2**63, 2**64 - 1]) |
| `max_new_tokens` | int in 0 .. MAX_NEW_TOKENS |
| `n` | int in 1 .. MAX_IMAGES_PER_PROMPT |
| `n` (answers to one question) | int in 1 .. MAX_CHOICES |
| `top_logprobs` | int in 0 .. MAX_TOP_LOGPROBS |
| `steps` | int in 1 .. MAX_STEPS |
| `cfg` | finite real in 0 .. MAX_CFG |
| `previews` | int in 0 .. MAX_PREVIEWS, and fewer than `steps` (each preview at its own step before the last) |
| `timeout` | None, or a finite real > 0 (seconds) |

`bool` is refused wherever a number is expected: `True` as a seed or a token count is a caller's bug.

These checks are the one statement of the bounds: the HTTP protocol models run them on their fields
(`check_*(value, name)` with the field's name), so the server and the runtime cannot disagree.
"""

from __future__ import annotations

import math
import operator
from numbers import Real
from typing import NamedTuple, SupportsIndex, cast

from jfexport.core.processor.errors import ProcessorInputError, RequestError

MAX_SEED = 2**63 - 1
# Logits are divided by the temperature in float32: far below this the quotient overflows to inf
# and the softmax gives NaN probabilities. Sampling this cold is greedy decoding in all but name.
MIN_TEMPERATURE = 1e-5
# OpenAI's bound: at 2 the softmax of the bundled models' logits is already close to uniform noise.
MAX_TEMPERATURE = 2.0
# Four times JanusFlow-1.3B's 16384-position context: a longer answer cannot be decoded anyway,
# and a runtime sizes its KV cache from this number.
MAX_NEW_TOKENS = 65536
MAX_IMAGES_PER_PROMPT = 64
# Answers to one question in one request: each is a row of the chat batch (a K/V slot), so a
# request cannot take more of the batch than this; OpenAI's own limit is 128.
MAX_CHOICES = 16
# OpenAI's bound: alternatives reported per answer token.
MAX_TOP_LOGPROBS = 20
# The official demo uses 30 Euler steps; 1000 is far past any quality gain and bounds the work.
MAX_STEPS = 1000
# The demo's guidance slider stops at 10; beyond 100 the CFG extrapolation only produces saturated noise.
MAX_CFG = 100.0
MAX_PREVIEWS = 3  # OpenAI's partial_images bound


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


def _integer(name: str, value: object, low: int, high: int | None) -> int:
    if isinstance(value, bool):
        raise RequestError(f"{name}: expected an integer, got a bool ({value})")
    try:
        # int and numpy integers; floats, even integral ones, are refused (TypeError, caught below)
        number = operator.index(cast(SupportsIndex, value))
    except TypeError:
        raise RequestError(f"{name}: expected an integer, got {type(value).__name__} {value!r}") from None
    if high is None and number < low:
        raise RequestError(f"{name}: must be at least {low}, got {number}")
    if high is not None and not low <= number <= high:
        raise RequestError(f"{name}: {number} is outside the accepted range {low} .. {high}")
    return number


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RequestError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise RequestError(f"{name}: must be a finite number, got {number}")
    return number


def check_prompt(prompt: object, name: str = "prompt") -> str:
    """Text with more than whitespace in it: the template strips the prompt, and nothing is left to render."""
    text = check_text(name, prompt)
    if not text.strip():
        raise RequestError(f"{name}: empty prompt (only whitespace)")
    return text


def check_index(index: object, count: int, name: str) -> int:
    """An index into `count` things (answers of a request, tokens read so far)."""
    if count == 0:
        raise RequestError(f"{name}: there is none yet to index, got {index!r}")
    return _integer(name, index, 0, count - 1)


def check_seed(seed: object, name: str = "seed") -> int:
    return _integer(name, seed, 0, MAX_SEED)


def check_temperature(temperature: object, name: str = "temperature") -> float:
    t = _real(name, temperature)
    if t < 0:
        raise RequestError(f"{name}: must be >= 0 (0 decodes greedily), got {temperature}")
    if 0 < t < MIN_TEMPERATURE:
        raise RequestError(f"{name}: must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature}")
    if t > MAX_TEMPERATURE:
        raise RequestError(f"{name}: must be at most {MAX_TEMPERATURE:g}, got {temperature}")
    return t


def check_top_p(top_p: object, name: str = "top_p") -> float:
    p = _real(name, top_p)
    if not 0 < p <= 1:
        raise RequestError(f"{name}: must be in (0, 1], got {p}")
    return p


def check_max_new_tokens(max_new_tokens: object, name: str = "max_new_tokens") -> int:
    return _integer(name, max_new_tokens, 0, MAX_NEW_TOKENS)


def check_images_per_prompt(n: object, name: str = "n") -> int:
    return _integer(name, n, 1, MAX_IMAGES_PER_PROMPT)


def check_choices(n: object, name: str = "n") -> int:
    return _integer(name, n, 1, MAX_CHOICES)


def check_top_logprobs(top: object, name: str = "top_logprobs") -> int:
    return _integer(name, top, 0, MAX_TOP_LOGPROBS)


def check_steps(steps: object, name: str = "steps") -> int:
    return _integer(name, steps, 1, MAX_STEPS)


def check_cfg(cfg: object, name: str = "cfg") -> float:
    weight = _real(name, cfg)
    if not 0 <= weight <= MAX_CFG:
        raise RequestError(f"{name}: must be in 0 .. {MAX_CFG:g}, got {weight}")
    return weight


class Sampling(NamedTuple):
    temperature: float
    top_p: float
    seed: int
    max_new_tokens: int


def check_sampling(temperature: object, top_p: object, seed: object, max_new_tokens: object) -> Sampling:
    """Parameters of understanding (text) decoding, as checked: the values to use from here on (a numpy
    integer seed becomes the int torch's generators take)."""
    return Sampling(check_temperature(temperature), check_top_p(top_p), check_seed(seed),
                    check_max_new_tokens(max_new_tokens))


def check_previews(previews: object, steps: int, name: str = "previews") -> int:
    count = _integer(name, previews, 0, MAX_PREVIEWS)
    if count >= steps:
        raise RequestError(f"{name}: {count} previews need at least {count + 1} steps (each is taken at its own step "
                           f"before the last), got steps={steps}")
    return count


class Generation(NamedTuple):
    n: int
    steps: int
    cfg: float
    seed: int
    previews: int


def check_generation(n: object, steps: object, cfg: object, seed: object, previews: object = 0) -> Generation:
    """Parameters of text-to-image generation, as checked: the values to use from here on."""
    count = check_steps(steps)
    return Generation(check_images_per_prompt(n), count, check_cfg(cfg), check_seed(seed),
                      check_previews(previews, count))


def check_timeout(timeout: object, name: str = "timeout", zero: bool = False) -> float | None:
    """None (no deadline) or a positive finite number of seconds: NaN would never expire, and a
    request's deadline already past is a caller's bug, not a timeout. `zero`: 0 is accepted too (a
    wait that only looks)."""
    if timeout is None:
        return None
    seconds = _real(name, timeout)
    if seconds < 0 or (seconds == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise RequestError(f"{name}: must be a number of seconds {bound} (or None for no deadline), got {timeout}")
    return seconds


def check_count(value: object, name: str, low: int = 0) -> int:
    """A runtime option that counts something (bytes, threads, requests): an integer >= `low`."""
    return _integer(name, value, low, None)
