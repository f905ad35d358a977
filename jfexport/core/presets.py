"""Named model configurations: `tiny` for tests, `small` for CPU benchmarks and `janusflow-1.3b`
(the released sizes) for full-size exports and GPU benchmarks.

The full-size dictionaries are the released config (JANUSFLOW.md 1.1); the only place in the
project where the real dimensions are written down.
"""

from __future__ import annotations

import copy
from typing import Any

from jfexport.core.errors import ConfigError

_JANUSFLOW_1_3B: dict[str, Any] = {
    "architectures": ["MultiModalityCausalLM"],
    "model_type": "multi_modality",
    "torch_dtype": "bfloat16",
    "language_config": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "max_position_embeddings": 16384,
        "model_type": "llama",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "torch_dtype": "bfloat16",
        "vocab_size": 102400,
    },
    "vision_und_enc_config": {
        "cls": "CLIPVisionTower",
        "model_type": "vision_und_enc",
        "params": {"image_size": 384, "model_name": "siglip_large_patch16_384", "select_feature": "same", "select_layer": -1},
    },
    "vision_gen_enc_config": {
        "cls": "ShallowUViTEncoder",
        "model_type": "vision_gen_enc",
        "params": {
            "block_out_channels": [768], "elementwize_affine": True, "hidden_size": 2048, "input_channels": 4,
            "kernel_size": 2, "layers_in_middle": 2, "norm_eps": 1e-6, "num_extra_tensors": 5, "padding": 0,
            "stride": 2, "use_bias": True, "use_mid_block": True,
        },
    },
    "vision_gen_dec_config": {
        "cls": "ShallowUViTDecoder",
        "model_type": "vision_gen_dec",
        "params": {
            "block_out_channels": [768], "elementwise_affine": True, "hidden_size": 2048, "in_channels": 768,
            "layers_in_middle": 2, "norm_eps": 1e-6, "out_channels": 4, "upsamples": 1, "use_bias": True,
            "use_mid_block": True,
        },
    },
}

# stabilityai/sdxl-vae (JANUSFLOW.md 6).
_SDXL_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}


def _tiny(vocab_size: int) -> dict[str, Any]:
    cfg = copy.deepcopy(_JANUSFLOW_1_3B)
    cfg["language_config"].update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=vocab_size, max_position_embeddings=1024,
    )
    cfg["vision_und_enc_config"]["params"] = {
        "image_size": 64, "model_name": "siglip_custom", "select_feature": "same", "select_layer": -1,
        "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 4,
    }
    cfg["vision_gen_enc_config"]["params"].update(block_out_channels=[32], hidden_size=64, layers_in_middle=1)
    cfg["vision_gen_dec_config"]["params"].update(block_out_channels=[32], hidden_size=64, in_channels=32, layers_in_middle=1)
    return cfg


# A 4x-downsampling VAE keeps the tiny preset's latents 16x16 for 64-px images (8x8 image tokens).
_TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "sample_size": 64, "scaling_factor": 1.0, "force_upcast": False,
}

def _small(vocab_size: int) -> dict[str, Any]:
    """Mid-size: large enough that benchmarks show where time goes, small enough for a CPU."""
    cfg = copy.deepcopy(_JANUSFLOW_1_3B)
    cfg["language_config"].update(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=vocab_size, max_position_embeddings=2048,
    )
    cfg["vision_und_enc_config"]["params"] = {
        "image_size": 256, "model_name": "siglip_custom", "select_feature": "same", "select_layer": -1,
        "patch_size": 16, "width": 384, "layers": 6, "heads": 6, "mlp_ratio": 4,
    }
    cfg["vision_gen_enc_config"]["params"].update(block_out_channels=[256], hidden_size=512, layers_in_middle=2)
    cfg["vision_gen_dec_config"]["params"].update(block_out_channels=[256], hidden_size=512, in_channels=256, layers_in_middle=2)
    return cfg


# An 8x VAE like SDXL's, narrower: 256-px images give 32x32 latents and 16x16 = 256 image tokens.
_SMALL_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [32, 64, 128, 128], "layers_per_block": 1, "norm_num_groups": 32, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 256, "scaling_factor": 0.13025, "force_upcast": False,
}

PRESETS = ("tiny", "small", "janusflow-1.3b")


def preset_config(name: str, vocab_size: int | None = None) -> dict[str, Any]:
    """Official-format config dict of a preset. `tiny` takes its vocab size from its tokenizer."""
    if name == "janusflow-1.3b":
        return copy.deepcopy(_JANUSFLOW_1_3B)
    if name in ("tiny", "small"):
        if vocab_size is None:
            raise ValueError(f"the {name} preset needs the vocab size of its tokenizer")
        return _tiny(vocab_size) if name == "tiny" else _small(vocab_size)
    raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")


def preset_vae_config(name: str) -> dict[str, Any]:
    if name == "janusflow-1.3b":
        return copy.deepcopy(_SDXL_VAE)
    if name == "tiny":
        return copy.deepcopy(_TINY_VAE)
    if name == "small":
        return copy.deepcopy(_SMALL_VAE)
    raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
