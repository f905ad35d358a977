"""Understanding-image preprocessing of the official VLMImageProcessor (JANUSFLOW.md 3.2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from None


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
) -> torch.Tensor:
    """PIL image -> normalised float32 [3, S, S]: aspect-preserving bicubic resize, centred paste."""
    image = image.convert("RGB")
    w, h = image.size
    longest = max(w, h)
    size = (max(int(w / longest * image_size), min_size), max(int(h / longest * image_size), min_size))
    # torchvision's resize of a PIL image is PIL's bicubic (antialiased): call it directly.
    image = image.resize(size, Image.BICUBIC)
    image = _expand_to_square(image, tuple(int(m * 255) for m in mean))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
