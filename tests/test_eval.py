"""The toy evaluation: the analyser reads rendered scenes exactly; the evaluator scores a perfect
and an empty pipeline at the extremes; the VAE trainer writes a loadable, scaled VAE."""

from __future__ import annotations

import random

import pytest
from jfexport.reference.bundle import load_vae
from jfexport.reference.eval.analyser import analyse
from jfexport.reference.eval.evaluate import evaluate
from jfexport.reference.training.toy_data import Scene, all_scenes, render, split_scenes
from jfexport.reference.training.vae import train_vae
from PIL import Image

from .conftest import run_cli


def test_analyser_reads_every_rendered_scene():
    rng = random.Random(0)
    for scene in all_scenes():
        found = analyse(render(scene, 64, rng))
        assert [(d.colour, d.shape, d.position) for d in found] == [(scene.colour, scene.shape, scene.position)]


def test_analyser_counts_objects_and_ignores_the_background():
    assert analyse(Image.new("RGB", (64, 64), (255, 255, 255))) == []
    two = render(Scene("red", "square", "top left"), 64)
    two.paste(render(Scene("blue", "circle", "bottom right"), 64).crop((32, 32, 64, 64)), (32, 32))
    assert sorted(d.colour for d in analyse(two)) == ["blue", "red"]


class _Oracle:
    """Draws exactly the captioned scene and answers from the scene: the evaluator's upper bound."""

    def __init__(self, perfect: bool):
        self.perfect = perfect
        self.scenes = {s.caption: s for s in all_scenes()}

    def generate(self, prompts, n=1, **kwargs):
        blank = Image.new("RGB", (64, 64), (255, 255, 255))
        return [render(self.scenes[p], 64) if self.perfect else blank for p in prompts for _ in range(n)]

    def chat(self, images, questions, **kwargs):
        answers = []
        for image, q in zip(images, questions):
            d = analyse(image)[0]
            truth = d.position if q.startswith("Where") else d.colour if "colour" in q else d.shape
            answers.append(truth if self.perfect else "?")
        return answers


def test_evaluator_scores_the_extremes():
    best = evaluate(_Oracle(True), 64, images_per_prompt=1)
    worst = evaluate(_Oracle(False), 64, images_per_prompt=1)
    assert best.generation_attribute_accuracy == best.understanding_accuracy == 1.0
    assert worst.generation_attribute_accuracy == worst.understanding_accuracy == 0.0
    assert best.images == len(split_scenes(0)[1])


def test_vae_trainer_writes_a_loadable_scaled_vae(tmp_path):
    train_vae(tmp_path / "vae", 32, steps=2, batch=2, log=lambda m: None)
    vae = load_vae(tmp_path / "vae")
    assert vae.config.scaling_factor > 0 and vae.config.scaling_factor != 1.0


def test_eval_cli_runs_on_the_torch_backend():
    res = run_cli("eval", "--backend", "torch", "--images-per-prompt", "1", "--steps", "2")
    assert res.returncode == 0, res.stderr
    assert "generation_attribute_accuracy" in res.stdout


def test_bundled_default_model_meets_its_targets():
    from jfexport.reference.bundle import DEFAULT_MODEL_DIR, load_bundle
    from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline

    bundle = load_bundle()
    assert bundle.source == str(DEFAULT_MODEL_DIR)
    result = evaluate(ReferencePipeline(bundle), bundle.image_size)
    assert result.generation_attribute_accuracy >= 0.8 and result.understanding_accuracy >= 0.9, result


def test_a_missing_bundled_model_is_named(monkeypatch, tmp_path):
    from jfexport.reference import bundle as bundle_module

    from jfexport.core.errors import CheckpointError

    monkeypatch.setattr(bundle_module, "DEFAULT_MODEL_DIR", tmp_path / "default")
    with pytest.raises(CheckpointError, match="bundled default model is missing"):
        bundle_module.load_bundle()
