"""A deterministic analyser of generated toy images: which colour, shape and position, and how many
objects. Pixels far from the white background form the objects (4-connected components)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..training.toy_data import COLOURS, POSITIONS

BACKGROUND_DISTANCE = 90  # RGB distance from white beyond which a pixel belongs to an object
MIN_AREA = 0.01  # components smaller than this share of the image are noise


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    position: str
    area: float


def _components(mask: np.ndarray) -> list[np.ndarray]:
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _shape(pixels: np.ndarray) -> str:
    """An upright triangle's mass sits 1/6 of its height below its box centre; circles and
    squares are centred. Then the fill ratio of the box: square ~1, circle ~pi/4. Both survive
    the rounded corners of a blurry decode, which a fill ratio alone (triangle ~1/2) does not."""
    (y0, x0), (y1, x1) = pixels.min(0), pixels.max(0)
    height = y1 - y0 + 1
    drop = (pixels[:, 0].mean() - (y0 + y1) / 2) / height
    if drop > 0.08:
        return "triangle"
    fill = len(pixels) / (height * (x1 - x0 + 1))
    return "square" if fill > 0.88 else "circle"


def analyse(image: Image.Image) -> list[Detection]:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = rgb.shape
    mask = np.linalg.norm(rgb - 255.0, axis=-1) > BACKGROUND_DISTANCE
    found = []
    for pixels in _components(mask):
        area = len(pixels) / (h * w)
        if area < MIN_AREA:
            continue
        mean = rgb[pixels[:, 0], pixels[:, 1]].mean(0)
        colour = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c])))
        cy, cx = pixels.mean(0) / np.array([h, w])
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
        found.append(Detection(colour, _shape(pixels), position, area))
    return found
