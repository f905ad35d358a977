"""A synthetic dataset the project generates itself: one coloured shape at a position per image,
with a caption (generation) and question/answer pairs (understanding). Deterministic from a seed;
`held_out` combinations never appear in training, for evaluation."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
             "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is in the image?",
             "position": "Where is the shape?"}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} at the {self.position}" if self.position != "center" else \
            f"a {self.colour} {self.shape} in the center"

    def answer(self, attribute: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "position": self.position}[attribute]


def all_scenes() -> list[Scene]:
    return [Scene(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]


def split_scenes(seed: int = 0, held_out: int = 6) -> tuple[list[Scene], list[Scene]]:
    """(train, held-out) scene lists; every attribute value still occurs in training."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    return scenes[held_out:], scenes[:held_out]


def render(scene: Scene, size: int, rng: random.Random | None = None) -> Image.Image:
    """The scene on a white background; `rng` jitters position and size slightly."""
    jitter = (lambda: rng.uniform(-0.04, 0.04)) if rng else (lambda: 0.0)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[scene.position]
    cx, cy, r = (cx + jitter()) * size, (cy + jitter()) * size, (0.17 + jitter() / 2) * size
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image
