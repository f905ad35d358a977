"""Training configuration, read from a JSON file (`jfexport train CONFIG.json`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from jfexport.core.errors import ConfigError
from jfexport.core.json_file import read_json

from .stages import STAGES


@dataclass
class TrainConfig:
    out: str  # run folder: checkpoint/, train_state.safetensors, log.jsonl
    stage: int = 1
    steps: int = 100
    batch_size: int = 8
    lr: float | None = None  # default: the stage's (paper Table 1)
    warmup: int | None = None
    ratio: tuple[int, int, int] | None = None  # understanding : generation : text
    init: dict = field(default_factory=lambda: {"preset": "tiny"})  # {"preset": NAME} or {"checkpoint": DIR}
    vae: str | None = None  # diffusers folder; default: the init model's
    image_size: int | None = None  # toy images; default: the model's
    repa_layer: int | None = 1  # LLM block whose output REPA aligns (6 for the 1.3B); None disables REPA
    repa_weight: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    prompt_drop: float = 0.1
    ema_decay: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be 1, 2 or 3, got {self.stage}")
        defaults = STAGES[self.stage]
        self.lr = defaults.lr if self.lr is None else self.lr
        self.warmup = defaults.warmup if self.warmup is None else self.warmup
        ratio = tuple(defaults.ratio if self.ratio is None else self.ratio)
        if len(ratio) != 3 or sum(ratio) <= 0 or min(ratio) < 0:
            raise ConfigError(f"ratio needs three non-negative weights (und, gen, text), got {ratio}")
        self.ratio = (ratio[0], ratio[1], ratio[2])
        if self.stage == 1 and ratio[0] + ratio[1] == 0:
            raise ConfigError(f"ratio {list(ratio)}: stage 1 trains only the modules around the LLM, which text "
                              "batches do not reach: give understanding or generation a weight")
        # Ranges, so that a wrong value is named here rather than met steps into training (a division
        # by zero, an optimizer's refusal) or, worse, trained with (a negative clip, a decay above 1).
        for key, ok, want in (
            ("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"), ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"), ("warmup", self.warmup >= 0, ">= 0"),
            ("seed", 0 <= self.seed < 2**63, "in 0 .. 2**63 - 1"),
            ("image_size", self.image_size is None or self.image_size >= 1, ">= 1 or null"),
            ("repa_layer", self.repa_layer is None or self.repa_layer >= 1, ">= 1 (an LLM block) or null"),
            ("repa_weight", self.repa_weight >= 0, ">= 0"), ("logit_std", self.logit_std > 0, "> 0"),
            ("prompt_drop", 0 <= self.prompt_drop <= 1, "in [0, 1]"), ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip > 0, "> 0"),
        ):
            if not ok:
                raise ConfigError(f"{key}: must be {want}, got {getattr(self, key)!r}")
        if not (len(self.init) == 1 and next(iter(self.init)) in ("preset", "checkpoint")
                and isinstance(next(iter(self.init.values())), str)):
            raise ConfigError(f'init: expected {{"preset": NAME}} or {{"checkpoint": DIR}}, got {self.init!r}')

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: training config not found")
        raw = read_json(path, ConfigError)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {unknown}")
        if "out" not in raw:
            raise ConfigError(f"{path}: needs an 'out' folder")
        for key, value in raw.items():
            check, kind = _KINDS[key]
            if not check(value):
                raise ConfigError(f"{path}: {key}: expected {kind}, got {type(value).__name__} {value!r}")
        return cls(**raw)

    def to_json(self) -> dict:
        return asdict(self)



def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or check(v)


INT, NUMBER = (_int, "an integer"), (_number, "a finite number")
# What each key of a config file must hold: JSON gives strings, floats and bools where the
# dataclass would take them silently, and the error would surface deep in training.
_KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "out": (lambda v: isinstance(v, str) and v != "", "a folder name"),
    "stage": INT, "steps": INT, "batch_size": INT, "seed": INT, "log_every": INT, "checkpoint_every": INT,
    "lr": (_optional(_number), "a finite number or null"), "warmup": (_optional(_int), "an integer or null"),
    "image_size": (_optional(_int), "an integer or null"), "repa_layer": (_optional(_int), "an integer or null"),
    "ratio": (_optional(lambda v: isinstance(v, list) and len(v) == 3 and all(map(_int, v))),
              "three integers [und, gen, text] or null"),
    "init": (lambda v: isinstance(v, dict), 'an object such as {"preset": "tiny"}'),
    "vae": (_optional(lambda v: isinstance(v, str)), "a folder name or null"),
    "repa_weight": NUMBER, "logit_mean": NUMBER, "logit_std": NUMBER, "prompt_drop": NUMBER, "ema_decay": NUMBER,
    "grad_clip": NUMBER,
}
