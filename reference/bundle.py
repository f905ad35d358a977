"""A loaded model with everything a pipeline needs: JanusFlow, VAE and processor.

Sources: a checkpoint folder in the official layout (plus `--vae DIR` or a `vae/` subfolder in
diffusers format) or a named preset with deterministic random weights. With neither, the bundled
default model is used so every command runs on a fresh machine.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from jfexport.core.config import JanusFlowConfig
from jfexport.core.errors import CheckpointError, InputError
from jfexport.core.graph_spec import GraphSpec
from jfexport.core.graph_specs import graph_specs
from jfexport.core.manifest import Limits
from jfexport.core.presets import preset_config, preset_vae_config
from jfexport.core.processor import JanusProcessor, JanusTokenizer, load_tokenizer

from .checkpoint import CONFIG_NAME, load_checkpoint, weight_files
from .init import init_random
from .modules.janusflow import JanusFlowModel

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
TINY_ASSETS = ASSETS / "tiny"
# The bundled default model: a tiny JanusFlow trained on the toy shapes data by
# `jfexport train-default` (docs/training.md), with its VAE and tokenizer.
DEFAULT_MODEL_DIR = ASSETS / "default"
PRESET_SEED = 0


@dataclass
class ModelBundle:
    model: JanusFlowModel
    vae: AutoencoderKL | None
    processor: JanusProcessor | None
    source: str  # folder path or "preset:NAME"
    fingerprint: str  # identifies the weights (checkpoint file hashes or preset name + seed)
    processor_folder: Path | None = None  # where tokenizer/processor files were read from

    @property
    def config(self) -> JanusFlowConfig:
        return self.model.config

    @property
    def image_size(self) -> int:
        """Side of generated images: the understanding resolution, as in the released model."""
        return self.config.vision_und.image_size

    @property
    def latent_size(self) -> int:
        factor = 2 ** (len(self.require_vae().config.block_out_channels) - 1)
        return self.image_size // factor

    def require_vae(self) -> AutoencoderKL:
        """The VAE, for whatever generates or trains images."""
        if self.vae is None:
            raise CheckpointError(f"{self.source}: no VAE loaded (pass --vae DIR or add a vae/ folder)")
        return self.vae

    def require_processor(self) -> JanusProcessor:
        """The processor, for whatever takes text: a folder without tokenizer files has none."""
        if self.processor is None:
            raise InputError(f"{self.source}: no tokenizer files; text prompts need tokenizer.json")
        return self.processor

    @property
    def latent_channels(self) -> int:
        return self.config.gen_enc.input_channels

    def graph_specs(self, limits: Limits = Limits()) -> dict[str, GraphSpec]:
        """The model's graph specs (`core.graph_specs`), from its config and its VAE's."""
        return graph_specs(self.config, self.latent_size, self.latent_channels,
                           self.vae.config if self.vae is not None else None, limits)


def load_vae(folder: str | Path) -> AutoencoderKL:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a diffusers AutoencoderKL folder (no config.json)")
    try:
        # low_cpu_mem_usage needs accelerate (not a dependency); asking for it off avoids the nag.
        # use_safetensors: a folder with only diffusion_pytorch_model.bin (a pickle) is refused, not unpickled.
        return AutoencoderKL.from_pretrained(str(folder), low_cpu_mem_usage=False, use_safetensors=True).eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise CheckpointError(f"{folder}: cannot load the VAE ({e})") from None


def _processor(folder: Path, config: JanusFlowConfig) -> JanusProcessor | None:
    if not (folder / "tokenizer.json").is_file():
        return None
    und = config.vision_und
    return JanusProcessor.from_folder(folder, image_size=und.image_size, num_image_tokens=und.num_patches)


def _file_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def load_folder(folder: str | Path, vae: str | Path | None = None, dtype: torch.dtype = torch.float32) -> ModelBundle:
    folder = Path(folder)
    model = load_checkpoint(folder, dtype)
    vae_dir = Path(vae) if vae is not None else folder / "vae"
    vae_model = load_vae(vae_dir) if (vae is not None or vae_dir.is_dir()) else None
    files = [folder / CONFIG_NAME, *weight_files(folder)]
    processor = _processor(folder, model.config)
    return ModelBundle(model, vae_model, processor, str(folder), _file_fingerprint(files), folder if processor else None)


def load_preset(name: str, seed: int = PRESET_SEED, dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Preset config with deterministic random weights; the tiny tokenizer serves every preset."""
    tokenizer: JanusTokenizer = load_tokenizer(TINY_ASSETS)
    vocab = len(tokenizer) if name in ("tiny", "small") else None
    config = JanusFlowConfig.from_dict(preset_config(name, vocab))
    if len(tokenizer) > config.language.vocab_size:
        raise CheckpointError(f"preset {name}: tokenizer has {len(tokenizer)} ids, vocab is {config.language.vocab_size}")
    model = JanusFlowModel(config)
    init_random(model, seed)
    vae = AutoencoderKL(**preset_vae_config(name))
    init_random(vae, seed + 1)
    und = config.vision_und
    processor = JanusProcessor.from_folder(TINY_ASSETS, image_size=und.image_size, num_image_tokens=und.num_patches)
    return ModelBundle(model.to(dtype).eval(), vae.eval(), processor, f"preset:{name}", f"preset:{name}:seed{seed}", TINY_ASSETS)


def load_bundle(
    checkpoint: str | Path | None = None,
    vae: str | Path | None = None,
    preset: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ModelBundle:
    if checkpoint is not None and preset is not None:
        raise CheckpointError("give either a checkpoint folder or a preset, not both")
    if checkpoint is not None:
        return load_folder(checkpoint, vae, dtype)
    if preset is None:
        if not (DEFAULT_MODEL_DIR / CONFIG_NAME).is_file():
            raise CheckpointError(f"the bundled default model is missing from {DEFAULT_MODEL_DIR}: reinstall jfexport, "
                                  "or pass --checkpoint DIR or --preset NAME")
        return load_folder(DEFAULT_MODEL_DIR, vae, dtype)
    bundle = load_preset(preset, dtype=dtype)
    if vae is not None:
        bundle.vae = load_vae(vae)
    return bundle
