"""`jfexport eval`: mini-GenEval on held-out captions and understanding accuracy on held-out
images. Works with anything that has `generate(prompts, ...)` and `chat(images, questions, ...)`:
the PyTorch reference or a runtime over built engines."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from ..training.toy_data import QUESTIONS, render, split_scenes
from .analyser import analyse

CHAT_CHUNK = 8
# How far a cheaper precision's accuracies may fall below its baseline's (`jfexport eval --against`):
# 0.05 is 1 of the 18 held-out questions, or ~5 of the 96 generated attributes.
MAX_ACCURACY_DROP = 0.05
ACCURACIES = ("generation_attribute_accuracy", "understanding_accuracy")


@dataclass
class EvalResult:
    generation_attribute_accuracy: float  # share of (image, attribute) pairs right: colour, shape, position, count
    generation_all_correct: float  # share of images with every attribute right
    understanding_accuracy: float
    images: int
    questions: int

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(pipeline, image_size: int, seed: int = 0, images_per_prompt: int = 4, steps: int = 30,
             cfg: float = 2.0) -> EvalResult:
    _, held_out = split_scenes(seed)
    right = total = all_right = 0
    for i, scene in enumerate(held_out):
        for image in pipeline.generate([scene.caption], n=images_per_prompt, steps=steps, cfg=cfg, seed=seed + i):
            found = analyse(image)
            checks = [len(found) == 1]
            if found:
                d = found[0]
                checks += [d.colour == scene.colour, d.shape == scene.shape, d.position == scene.position]
            else:
                checks += [False, False, False]
            right += sum(checks)
            total += len(checks)
            all_right += all(checks)
    rng = random.Random(seed)
    images, questions, answers = [], [], []
    for scene in held_out:
        for attribute, question in QUESTIONS.items():
            images.append(render(scene, image_size, rng))
            questions.append(question)
            answers.append(scene.answer(attribute))
    # Built engines cap the batch rows: ask in chunks any build accepts.
    replies = [reply for i in range(0, len(questions), CHAT_CHUNK)
               for reply in pipeline.chat(images[i:i + CHAT_CHUNK], questions[i:i + CHAT_CHUNK], max_new_tokens=8)]
    correct = sum(reply.strip().lower() == answer for reply, answer in zip(replies, answers))
    n_images = len(held_out) * images_per_prompt
    return EvalResult(right / total, all_right / n_images, correct / len(answers), n_images, len(answers))


def accuracy_drops(result: EvalResult, baseline: EvalResult) -> dict[str, float]:
    """How much lower each accuracy is than the baseline's (negative: higher)."""
    return {name: getattr(baseline, name) - getattr(result, name) for name in ACCURACIES}
