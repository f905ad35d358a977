"""JanusFlow configuration in the official `config.json` format.

The official file (``model_type: multi_modality``) nests one dict per part; the vision and
generation parts carry a class name (``cls``) and constructor ``params``. We keep the raw dict
so that saving writes back exactly what was read, and expose typed views with every dimension
the model code needs: nothing downstream hard-codes a size.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODEL_TYPE = "multi_modality"

# Vision towers the official `create_siglip_vit` knows (janus/janusflow/models/siglip_vit.py).
SIGLIP_MODELS: dict[str, dict[str, Any]] = {
    "siglip_so400m_patch14_384": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_so400m_patch14_224": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_large_patch16_384": dict(patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
}
# jfexport extension for small presets: the tower's sizes are given in `params` directly.
CUSTOM_SIGLIP = "siglip_custom"
_CUSTOM_KEYS = ("patch_size", "width", "layers", "heads", "mlp_ratio")


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
        try:
            heads = int(d["num_attention_heads"])
            return cls(
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads", heads)),
                vocab_size=int(d["vocab_size"]),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(d.get("rope_theta", 10000.0)),
            )
        except KeyError as e:
            raise ConfigError(f"language_config is missing {e.args[0]!r}") from None


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
        # Official CLIPVisionTower: select_layer > 0 keeps that many blocks, <= 0 counts from the end.
        return self.select_layer if self.select_layer > 0 else self.depth + self.select_layer + 1

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionUndConfig":
        p = d.get("params", {})
        name = p.get("model_name", "siglip_large_patch16_384")
        if name == CUSTOM_SIGLIP:
            missing = [k for k in _CUSTOM_KEYS if k not in p]
            if missing:
                raise ConfigError(f"vision_und_enc_config: model_name {CUSTOM_SIGLIP!r} needs params {missing}")
            arch = {k: p[k] for k in _CUSTOM_KEYS}
        elif name in SIGLIP_MODELS:
            arch = SIGLIP_MODELS[name]
        else:
            raise ConfigError(
                f"vision_und_enc_config: unknown model_name {name!r} (known: {sorted(SIGLIP_MODELS) + [CUSTOM_SIGLIP]})"
            )
        cfg = cls(
            model_name=name,
            image_size=int(p.get("image_size", 384)),
            select_layer=int(p.get("select_layer", -1)),
            patch_size=int(arch["patch_size"]),
            width=int(arch["width"]),
            depth=int(arch["layers"]),
            heads=int(arch["heads"]),
            mlp_ratio=float(arch["mlp_ratio"]),
        )
        if not 1 <= cfg.num_blocks <= cfg.depth:
            raise ConfigError(f"vision_und_enc_config: select_layer {cfg.select_layer} keeps {cfg.num_blocks} blocks")
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"vision_und_enc_config: image_size {cfg.image_size} not a multiple of patch {cfg.patch_size}")
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
        p = d.get("params", {})
        kernel, stride = int(p.get("kernel_size", 7)), int(p.get("stride", 4))
        padding = p.get("padding")
        blocks = list(p.get("block_out_channels", [768]))
        return cls(
            input_channels=int(p.get("input_channels", 3)),
            kernel_size=kernel,
            stride=stride,
            padding=int(math.ceil(kernel - stride)) if padding is None else int(padding),
            channels=int(blocks[-1]),
            layers_in_middle=int(p.get("layers_in_middle", 2)),
            hidden_size=int(p.get("hidden_size", 2048)),
            norm_eps=float(p.get("norm_eps", 1e-6)),
            use_bias=bool(p.get("use_bias", True)),
            use_mid_block=bool(p.get("use_mid_block", True)),
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
        p = d.get("params", {})
        blocks = list(p.get("block_out_channels", [768]))
        return cls(
            in_channels=int(p.get("in_channels", 768)),
            out_channels=int(p.get("out_channels", 3)),
            channels=int(blocks[-1]),
            upsamples=int(p.get("upsamples", 2)),
            layers_in_middle=int(p.get("layers_in_middle", 2)),
            hidden_size=int(p.get("hidden_size", 2048)),
            norm_eps=float(p.get("norm_eps", 1e-6)),
            use_bias=bool(p.get("use_bias", True)),
            use_mid_block=bool(p.get("use_mid_block", True)),
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
        raw = self.raw
        if raw.get("model_type") != MODEL_TYPE:
            raise ConfigError(
                f"config model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r} (a JanusFlow checkpoint)"
            )
        for key, classes in _PARTS.items():
            part = raw.get(key)
            if not isinstance(part, dict):
                raise ConfigError(f"config has no {key!r} section")
            if part.get("cls") not in classes:
                raise ConfigError(f"{key}.cls is {part.get('cls')!r}, expected one of {classes}")
        if not isinstance(raw.get("language_config"), dict):
            raise ConfigError("config has no 'language_config' section")
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
        if d % self.language.num_attention_heads:
            raise ConfigError(f"hidden_size {d} not divisible by num_attention_heads {self.language.num_attention_heads}")

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
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.raw, indent=2, sort_keys=True) + "\n")
