"""JanusFlow configuration in the official `config.json` format.

The official file (``model_type: multi_modality``) nests one dict per part; the vision and
generation parts carry a class name (``cls``) and constructor ``params``. We keep the raw dict
so that saving writes back exactly what was read, and expose typed views with every dimension
the model code needs: nothing downstream hard-codes a size.

Every value is type- and range-checked before anything is built, and errors name the key
(`language_config.vocab_size: ...`): a hostile or corrupt config.json must not make the loader
allocate terabytes or crash deep inside torch. Integers must be JSON integers (not floats,
strings or booleans), flags JSON booleans. The bounds are far above JanusFlow-1.3B's sizes:

| key | 1.3B | accepted |
|---|---|---|
| hidden sizes (LLM, SigLIP width, UViT channels) | 2048, 1024, 768 | 1 .. 16384 |
| `intermediate_size` | 5632 | 1 .. 65536 |
| layers (LLM, SigLIP) | 24, 24 | 1 .. 256 |
| attention heads | 16, 16 | 1 .. 256, dividing the width, even head size for RoPE |
| `vocab_size` | 102400 | 1 .. 2**20 |
| `max_position_embeddings` | 16384 | 1 .. 2**20 |
| `image_size`, `patch_size` | 384, 16 | 1 .. 4096 |
| estimated parameters (all matrices) | about 2.0e9 | at most MAX_PARAMETERS = 2e10 (80 GB in fp32) |

The parameter bound is what keeps the product of individually valid sizes sane.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jfexport.core.errors import ConfigError
from jfexport.core.json_file import read_json

MODEL_TYPE = "multi_modality"

# Vision towers the official `create_siglip_vit` knows (SigLIP_MODEL_CONFIG in
# janus/janusflow/models/siglip_vit.py of deepseek-ai/Janus). The official entries also carry an
# image_size, but the tower is built at the config's `params.image_size`, as officially.
SIGLIP_MODELS: dict[str, dict[str, Any]] = {
    "siglip_so400m_patch14_384": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_so400m_patch14_224": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_large_patch16_384": dict(patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
    "siglip_large_patch16_256": dict(patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
}
# jfexport extension for small presets: the tower's sizes are given in `params` directly.
CUSTOM_SIGLIP = "siglip_custom"
_CUSTOM_KEYS = ("patch_size", "width", "layers", "heads", "mlp_ratio")


MAX_WIDTH = 16384
MAX_FFN = 65536
MAX_LAYERS = 256
MAX_HEADS = 256
MAX_VOCAB = 2**20
MAX_POSITIONS = 2**20
MAX_IMAGE_SIZE = 4096
MAX_SMALL = 64  # channels of latents and images, kernel sizes, strides, blocks in the UViT middle
MAX_PARAMETERS = 2 * 10**10
MAX_CONFIG_BYTES = 1 << 20  # the released config.json has 1.5 kB

_REQUIRED = object()


def _section(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _int(d: dict[str, Any], key: str, where: str, default: Any = _REQUIRED, low: int = 1, high: int = MAX_WIDTH) -> int:
    if key not in d:
        if default is _REQUIRED:
            raise ConfigError(f"{where} is missing {key!r}")
        return default
    value = d[key]
    # bool is an int subclass in Python: `true` must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key}: expected an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{where}.{key}: {value} is outside the accepted range {low} .. {high}")
    return value


def _float(d: dict[str, Any], key: str, where: str, default: float, high: float) -> float:
    """A finite number in (0, high]: every float of the config is an epsilon, a ratio or a base."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.{key}: expected a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and 0 < value <= high):
        raise ConfigError(f"{where}.{key}: {value} is outside the accepted range (0, {high:g}]")
    return float(value)


def _bool(d: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true or false, got {type(value).__name__} {value!r}")
    return value


def _channels(p: dict[str, Any], where: str) -> int:
    """The last of `block_out_channels` (the only one JanusFlow's shallow UViT uses)."""
    blocks = p.get("block_out_channels", [768])
    if not isinstance(blocks, list) or not blocks:
        raise ConfigError(f"{where}.block_out_channels: expected a non-empty list of integers, got {blocks!r}")
    for i, value in enumerate(blocks):
        _int({f"block_out_channels[{i}]": value}, f"block_out_channels[{i}]", where)
    return blocks[-1]


@dataclass(frozen=True)
class LanguageConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LanguageConfig":
        # Absent keys take the LlamaConfig defaults, as the official loader does (JANUSFLOW.md 1.1).
        w = "language_config"
        d = _section(d, w)
        hidden = _int(d, "hidden_size", w)
        heads = _int(d, "num_attention_heads", w, high=MAX_HEADS)
        kv_heads = _int(d, "num_key_value_heads", w, heads, high=MAX_HEADS)
        if hidden % heads or (hidden // heads) % 2:
            raise ConfigError(
                f"{w}.num_attention_heads: hidden_size {hidden} / {heads} heads must be a whole, even head size (RoPE)"
            )
        if heads % kv_heads:
            raise ConfigError(f"{w}.num_key_value_heads: {kv_heads} does not divide num_attention_heads {heads}")
        return cls(
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size", w, high=MAX_FFN),
            num_hidden_layers=_int(d, "num_hidden_layers", w, high=MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=_int(d, "vocab_size", w, high=MAX_VOCAB),
            max_position_embeddings=_int(d, "max_position_embeddings", w, 2048, high=MAX_POSITIONS),
            rms_norm_eps=_float(d, "rms_norm_eps", w, 1e-6, 1.0),
            rope_theta=_float(d, "rope_theta", w, 10000.0, 1e12),
        )

    @property
    def parameters(self) -> int:
        """Upper estimate of the weights: embeddings, LM head and per layer attention + MLP."""
        d = self.hidden_size
        return 2 * self.vocab_size * d + self.num_hidden_layers * (4 * d * d + 3 * d * self.intermediate_size)


@dataclass(frozen=True)
class VisionUndConfig:
    model_name: str
    image_size: int
    select_layer: int
    patch_size: int
    width: int
    depth: int  # blocks of the full tower; `num_blocks` are the ones kept
    heads: int
    mlp_ratio: float

    @property
    def num_blocks(self) -> int:
        # Official create_siglip_vit: select_layer > 0 keeps that many blocks, <= 0 counts from the
        # end; never more than the tower has.
        kept = self.select_layer if self.select_layer > 0 else self.depth + self.select_layer + 1
        return min(kept, self.depth)

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        # Rounded down, like the strided patch conv: officially so400m/14 runs at 384 px (27 x 27, 6 px unused).
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def parameters(self) -> int:
        return self.num_blocks * (4 * self.width**2 + 2 * self.width * self.mlp_dim) + self.num_patches * self.width

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionUndConfig":
        w = "vision_und_enc_config.params"
        p = _section(_section(d, "vision_und_enc_config").get("params", {}), w)
        name = p.get("model_name", "siglip_large_patch16_384")
        if name == CUSTOM_SIGLIP:
            missing = [k for k in _CUSTOM_KEYS if k not in p]
            if missing:
                raise ConfigError(f"vision_und_enc_config: model_name {CUSTOM_SIGLIP!r} needs params {missing}")
            arch, where = p, w
        elif isinstance(name, str) and name in SIGLIP_MODELS:
            arch, where = SIGLIP_MODELS[name], f"SigLIP model {name}"
        else:
            raise ConfigError(
                f"{w}.model_name: unknown model_name {name!r} (known: {sorted(SIGLIP_MODELS) + [CUSTOM_SIGLIP]})"
            )
        image_size = _int(p, "image_size", w, 384, high=MAX_IMAGE_SIZE)
        depth = _int(arch, "layers", where, high=MAX_LAYERS)
        cfg = cls(
            model_name=name,
            image_size=image_size,
            select_layer=_int(p, "select_layer", w, -1, low=-MAX_LAYERS, high=MAX_LAYERS),
            patch_size=_int(arch, "patch_size", where, high=image_size),
            width=_int(arch, "width", where),
            depth=depth,
            heads=_int(arch, "heads", where, high=MAX_HEADS),
            mlp_ratio=_float(arch, "mlp_ratio", where, 4.0, 64.0),
        )
        if cfg.num_blocks < 1:
            raise ConfigError(f"{w}.select_layer: {cfg.select_layer} keeps {cfg.num_blocks} of {depth} blocks")
        if cfg.width % cfg.heads:
            raise ConfigError(f"{where}.heads: {cfg.heads} does not divide width {cfg.width}")
        if cfg.mlp_dim < 1:
            raise ConfigError(f"{where}.mlp_ratio: {cfg.mlp_ratio} gives an empty MLP for width {cfg.width}")
        return cfg


@dataclass(frozen=True)
class GenEncoderConfig:
    input_channels: int
    kernel_size: int
    stride: int
    padding: int
    channels: int  # block_out_channels[-1]
    layers_in_middle: int
    hidden_size: int
    norm_eps: float
    use_bias: bool
    use_mid_block: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenEncoderConfig":
        # Defaults are those of the official ShallowUViTEncoder signature.
        w = "vision_gen_enc_config.params"
        p = _section(_section(d, "vision_gen_enc_config").get("params", {}), w)
        kernel = _int(p, "kernel_size", w, 7, high=MAX_SMALL)
        stride = _int(p, "stride", w, 4, high=MAX_SMALL)
        # The official default padding is ceil(kernel - stride); an explicit null means the same.
        padding = p.get("padding")
        return cls(
            input_channels=_int(p, "input_channels", w, 3, high=MAX_SMALL),
            kernel_size=kernel,
            stride=stride,
            padding=max(0, kernel - stride) if padding is None else _int(p, "padding", w, low=0, high=MAX_SMALL),
            channels=_channels(p, w),
            layers_in_middle=_int(p, "layers_in_middle", w, 2, low=0, high=MAX_SMALL),
            hidden_size=_int(p, "hidden_size", w, 2048),
            norm_eps=_float(p, "norm_eps", w, 1e-6, 1.0),
            use_bias=_bool(p, "use_bias", w, True),
            use_mid_block=_bool(p, "use_mid_block", w, True),
        )


@dataclass(frozen=True)
class GenDecoderConfig:
    in_channels: int
    out_channels: int
    channels: int  # block_out_channels[-1]
    upsamples: int
    layers_in_middle: int
    hidden_size: int
    norm_eps: float
    use_bias: bool
    use_mid_block: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenDecoderConfig":
        # Defaults are those of the official ShallowUViTDecoder signature.
        w = "vision_gen_dec_config.params"
        p = _section(_section(d, "vision_gen_dec_config").get("params", {}), w)
        return cls(
            in_channels=_int(p, "in_channels", w, 768),
            out_channels=_int(p, "out_channels", w, 3, high=MAX_SMALL),
            channels=_channels(p, w),
            upsamples=_int(p, "upsamples", w, 2, high=8),
            layers_in_middle=_int(p, "layers_in_middle", w, 2, low=0, high=MAX_SMALL),
            hidden_size=_int(p, "hidden_size", w, 2048),
            norm_eps=_float(p, "norm_eps", w, 1e-6, 1.0),
            use_bias=_bool(p, "use_bias", w, True),
            use_mid_block=_bool(p, "use_mid_block", w, True),
        )


_PARTS = {
    "vision_und_enc_config": ("CLIPVisionTower",),
    "vision_gen_enc_config": ("ShallowUViTEncoder",),
    "vision_gen_dec_config": ("ShallowUViTDecoder",),
}


@dataclass
class JanusFlowConfig:
    raw: dict[str, Any]
    language: LanguageConfig = field(init=False)
    vision_und: VisionUndConfig = field(init=False)
    gen_enc: GenEncoderConfig = field(init=False)
    gen_dec: GenDecoderConfig = field(init=False)

    def __post_init__(self) -> None:
        raw = _section(self.raw, "config")
        if raw.get("model_type") != MODEL_TYPE:
            raise ConfigError(
                f"config model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r} (a JanusFlow checkpoint)"
            )
        for key in (*_PARTS, "language_config"):
            if key not in raw:
                raise ConfigError(f"config has no {key!r} section")
            _section(raw[key], key)
        for key, classes in _PARTS.items():
            if raw[key].get("cls") not in classes:
                raise ConfigError(f"{key}.cls is {raw[key].get('cls')!r}, expected one of {classes}")
        self.language = LanguageConfig.from_dict(raw["language_config"])
        self.vision_und = VisionUndConfig.from_dict(raw["vision_und_enc_config"])
        self.gen_enc = GenEncoderConfig.from_dict(raw["vision_gen_enc_config"])
        self.gen_dec = GenDecoderConfig.from_dict(raw["vision_gen_dec_config"])
        self._check_consistency()

    def _check_consistency(self) -> None:
        d = self.language.hidden_size
        if self.gen_enc.hidden_size != d or self.gen_dec.hidden_size != d:
            raise ConfigError(
                f"generation encoder/decoder hidden_size ({self.gen_enc.hidden_size}/{self.gen_dec.hidden_size}) "
                f"must equal the LLM hidden_size {d}: they condition on the LLM-sized time embedding"
            )
        if self.gen_dec.in_channels != self.gen_enc.channels:
            raise ConfigError(
                f"vision_gen_dec in_channels {self.gen_dec.in_channels} must equal the encoder width {self.gen_enc.channels}"
            )
        if self.parameters > MAX_PARAMETERS:
            raise ConfigError(
                f"the sizes describe about {self.parameters:.3g} parameters, over the limit of {MAX_PARAMETERS:.3g} "
                f"(language_config: {self.language.parameters:.3g}, vision_und_enc_config: {self.vision_und.parameters:.3g})"
            )

    @property
    def parameters(self) -> int:
        """Upper estimate of the weight count, from the sizes alone (nothing is allocated)."""
        d = self.language.hidden_size
        # A ConvNeXt block: two 4x pointwise layers and the FiLM mapper from the time embedding.
        blocks = (self.gen_enc.layers_in_middle * (8 * self.gen_enc.channels**2 + 2 * d * self.gen_enc.channels)
                  + self.gen_dec.layers_in_middle * (8 * (self.gen_dec.in_channels + self.gen_dec.channels) ** 2
                                                     + 2 * d * (self.gen_dec.in_channels + self.gen_dec.channels)))
        aligners = (self.vision_und.width + 2 * self.gen_enc.channels + self.gen_dec.in_channels) * d
        return self.language.parameters + self.vision_und.parameters + blocks + aligners

    @property
    def latent_downsample(self) -> int:
        """Latent pixels per image token along one side (the encoder's patchify stride)."""
        return self.gen_enc.stride

    def image_grid(self, latent_size: int) -> int:
        """Image-token grid side for a square latent of `latent_size` pixels."""
        if latent_size % self.gen_enc.stride:
            raise ConfigError(f"latent size {latent_size} not a multiple of the encoder stride {self.gen_enc.stride}")
        return latent_size // self.gen_enc.stride

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "JanusFlowConfig":
        return cls(copy.deepcopy(raw))

    @classmethod
    def from_file(cls, path: str | Path) -> "JanusFlowConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (a checkpoint folder needs config.json)")
        if (size := path.stat().st_size) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes, over the {MAX_CONFIG_BYTES} a config.json may have")
        raw = read_json(path, ConfigError)
        try:
            return cls(_section(raw, "config"))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.raw, indent=2, sort_keys=True) + "\n")
