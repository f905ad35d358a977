"""Read and write checkpoints in the official JanusFlow layout.

A checkpoint folder holds `config.json` (official format) and `model.safetensors` or sharded
safetensors with `model.safetensors.index.json`, plus tokenizer/processor files when present.
Keys use the official names; the SigLIP tower is remapped to transformers' names in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jfexport.core.config import JanusFlowConfig
from jfexport.core.errors import CheckpointError

from .modules.janusflow import JanusFlowModel
from .modules.siglip import TOWER_PREFIX, UNUSED_PREFIX, hf_to_timm, official_key, timm_to_hf

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def weight_files(folder: Path) -> list[Path]:
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) not in {folder}: {missing}")
        return [folder / s for s in shards]
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(folder)):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
    return state


def load_weights(model: JanusFlowModel, official: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Load official-named tensors into `model`; returns the unused tensors (attention-pool head).

    Anything else missing, unexpected or mis-shaped raises a CheckpointError naming the keys.
    """
    unused = {k: v for k, v in official.items() if k.startswith(UNUSED_PREFIX)}
    if unused:
        log.info("%s: skipping %d unused SigLIP attention-pool tensors (%s*)", source, len(unused), UNUSED_PREFIX)
    renamed = timm_to_hf({k: v for k, v in official.items() if k not in unused}, TOWER_PREFIX)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        official_missing = sorted({official_key(k, TOWER_PREFIX) for k in missing})
        parts = []
        if official_missing:
            parts.append(f"missing keys {_clip(official_missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_clip(unexpected)}")
        raise CheckpointError(f"{source}: weights do not match the config: " + "; ".join(parts))
    wrong = [
        f"{k}: checkpoint {tuple(renamed[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if renamed[k].shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{source}: mis-shaped tensors: {_clip(wrong)}")
    model.load_state_dict(renamed, strict=True)
    return unused


def _clip(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32) -> JanusFlowModel:
    """Build the model from `folder/config.json` and load its weights (upcast exactly from bf16)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder {'is not a folder' if folder.exists() else 'does not exist'}")
    config = JanusFlowConfig.from_file(folder / CONFIG_NAME)
    model = JanusFlowModel(config)
    model.unused_tensors = load_weights(model, read_state_dict(folder), str(folder))
    return model.to(dtype).eval()


def official_state_dict(model: JanusFlowModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = hf_to_timm(model.state_dict(), TOWER_PREFIX)
    state.update(getattr(model, "unused_tensors", {}))
    return {k: (v.to(dtype) if dtype is not None else v).detach().contiguous() for k, v in sorted(state.items())}


def save_checkpoint(
    model: JanusFlowModel,
    folder: str | Path,
    dtype: torch.dtype | None = torch.bfloat16,
    extra_files: list[Path] | None = None,
) -> None:
    """Write config.json + model.safetensors (official names, bf16 like the release by default).

    The folder is written under a temporary name and renamed, so an interrupted save never leaves
    a folder that looks complete.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.config.save(tmp / CONFIG_NAME)
        save_file(official_state_dict(model, dtype), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for f in extra_files or []:
            shutil.copy2(f, tmp / f.name)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
