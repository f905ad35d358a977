"""Understanding-image preprocessing of the official VLMImageProcessor (JANUSFLOW.md 3.2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ProcessorInputError


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ProcessorInputError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ProcessorInputError(f"{path}: not a readable image ({e})") from None


def _expand_to_square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    # Centred, rounded down, as the official expand2square.
    canvas.paste(img, (0, (side - h) // 2) if w > h else ((side - w) // 2, 0))
    return canvas


def preprocess_image(
    image: Image.Image,
    image_size: int,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    min_size: int = 14,
    normalize: bool = True,
) -> torch.Tensor:
    """PIL image -> float32 [3, S, S]: aspect-preserving bicubic resize, centred paste, normalise.

    `normalize=False` mirrors a preprocessor_config with `do_normalize: false` (early Janus
    checkpoints): values stay in [0, 1], but the background colour still comes from `mean`.
    """
    # Official callers convert at load time; repeating it here keeps RGBA/L inputs from reaching
    # expand2square, which keeps the mode and would paste the wrong background.
    image = image.convert("RGB")
    w, h = image.size
    longest = max(w, h)
    size = (max(int(w / longest * image_size), min_size), max(int(h / longest * image_size), min_size))
    # torchvision's resize of a PIL image is PIL's antialiased bicubic: call it directly.
    image = image.resize(size, Image.BICUBIC)
    image = _expand_to_square(image, tuple(int(m * 255) for m in mean))
    # float32 division equals transformers' float64 rescale cast to float32 for all 256 levels.
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    if not normalize:
        return x.contiguous()
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
