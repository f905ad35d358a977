"""Understanding-image preprocessing of the official VLMImageProcessor (JANUSFLOW.md 3.2).

Images are size-checked from their header before any pixel is decoded (`Image.open` is lazy), so
a small file declaring a huge canvas costs nothing; and high-bit-depth grayscale is scaled to
8 bits rather than clipped as PIL's `convert("RGB")` clips it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jfexport.core.processor.errors import ProcessorInputError

# 16.8 MP: a 4096 x 4096 photo decodes to 50 MB of RGB; PIL's own bomb limit (89 MP, error only
# past 179 MP) lets a 17 kB PNG cost gigabytes. Understanding resizes to 384 px anyway.
MAX_PIXELS = 4096 * 4096

# What PIL raises for a file it cannot decode: UnidentifiedImageError is an OSError; broken
# chunks give SyntaxError, struct.error or EOFError; bad tiles and impossible modes ValueError;
# over twice its pixel limit DecompressionBombError (and the warning, where warnings are errors).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)


def check_image_size(image: Image.Image, max_pixels: int = MAX_PIXELS, name: str = "image") -> None:
    """Refuse images over `max_pixels` or PIL's decompression-bomb limit, whichever is lower.

    PIL only warns between its limit and twice it; this refuses there too, by an explicit check
    rather than a warnings filter, which would be process-wide and so not thread-safe.
    """
    w, h = image.size
    if w < 1 or h < 1:
        raise ProcessorInputError(f"{name}: empty image ({w}x{h})")
    bomb = Image.MAX_IMAGE_PIXELS
    limit, why = (max_pixels, "") if bomb is None or max_pixels <= bomb else (bomb, " (PIL's decompression-bomb limit)")
    if w * h > limit:
        raise ProcessorInputError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {limit} pixels{why}")


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """Grayscale with more than 8 bits per pixel -> mode L, scaled by the data's bit depth.

    "I;16*" is 16-bit by its mode. "I" (32-bit) is how decoders hand over 16-bit data too, so it is
    read as 16-bit when its values fit, else as 32-bit. "F" in [0, 1] is the float convention;
    larger floats are read like "I" after PIL's own 8-bit convention (values up to 255).
    """
    x = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    top = float(x.max(initial=0.0))
    if image.mode.startswith("I;16"):
        full = 65535.0
    elif image.mode == "F" and top <= 1.0:
        full = 1.0
    elif image.mode == "F" and top <= 255.0:
        full = 255.0
    else:
        full = 65535.0 if top <= 65535 else 2.0**31 - 1
    return Image.fromarray(np.rint(x.clip(max=full) * (255.0 / full)).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """RGB version of `image`, decoding it if it is still lazy; undecodable pixels are an input error."""
    try:
        if image.mode.startswith("I") or image.mode == "F":
            image = _gray_to_8bit(image)
        return image.convert("RGB")
    except _DECODE_ERRORS as e:
        raise ProcessorInputError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The RGB image in `path`; refused before decoding when its header declares over `max_pixels`."""
    path = Path(path)
    if not path.is_file():
        what = "not a regular file (a folder, a FIFO, a device)" if path.exists() else "image file not found"
        raise ProcessorInputError(f"{path}: {what}")
    try:
        img = Image.open(path)
    except _DECODE_ERRORS as e:
        raise ProcessorInputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    with img:
        check_image_size(img, max_pixels, str(path))
        return to_rgb(img, str(path))


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
    if image.mode != "RGB":
        image = to_rgb(image)
    w, h = image.size
    longest = max(w, h)
    size = (max(int(w / longest * image_size), min_size), max(int(h / longest * image_size), min_size))
    # torchvision's resize of a PIL image is PIL's antialiased bicubic: call it directly.
    image = image.resize(size, Image.Resampling.BICUBIC)
    r, g, b = (int(m * 255) for m in mean)
    image = _expand_to_square(image, (r, g, b))
    # float32 division equals transformers' float64 rescale cast to float32 for all 256 levels.
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    if not normalize:
        return x.contiguous()
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
