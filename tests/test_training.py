"""Training: each stage's losses fall on a fixed batch and frozen parameters do not move;
the loop resumes and writes checkpoints the reference loader and `build` accept."""

from __future__ import annotations

import json

import pytest
import torch
from jfexport.reference.bundle import load_bundle, load_preset
from jfexport.reference.training.config import TrainConfig
from jfexport.reference.training.loop import ToyBatches, train
from jfexport.reference.training.losses import RepaHead
from jfexport.reference.training.objectives import generation_loss, text_loss, understanding_loss
from jfexport.reference.training.stages import apply_stage, trainable_names


def _losses(stage: int, steps: int = 12) -> tuple[dict[str, list[float]], dict, dict]:
    torch.manual_seed(0)
    bundle = load_preset("tiny")
    model, vae, proc = bundle.model.train(), bundle.vae.eval(), bundle.processor
    repa = RepaHead(model.config.language.hidden_size, model.config.vision_und.width)
    params = apply_stage(model, repa, stage)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    data = ToyBatches(64, seed=0)
    gen_batch, und_batch, txt_batch = data.generation(4), data.understanding(4), data.text(4)
    history: dict[str, list[float]] = {"rf": [], "repa": [], "ar": [], "text": []}
    for _ in range(steps):
        parts = generation_loss(model, vae, proc, *gen_batch, torch.Generator().manual_seed(1), 0.0, 0.0, 1.0, repa, 1)
        parts.update(understanding_loss(model, proc, *und_batch))
        parts.update(text_loss(model, proc, txt_batch))
        opt.zero_grad()
        sum(parts.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, v in parts.items():
            history[k].append(float(v.detach()))
    after = {n: p.detach() for n, p in model.named_parameters()}
    return history, before, after


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_losses_fall_and_frozen_parameters_stay(stage):
    history, before, after = _losses(stage)
    for name in ("rf", "repa", "ar") if stage == 1 else ("rf", "repa", "ar", "text"):
        assert history[name][-1] < history[name][0], (name, history[name])
    model = load_preset("tiny").model
    train = trainable_names(model, stage)
    frozen = [n for n in before if n not in train]
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in train)
    if stage == 1:
        assert frozen and all(not n.startswith(("vision_gen", "vision_und_enc_aligner")) for n in frozen)
    if stage == 2:
        assert {n for n in frozen} == {n for n in before if n.startswith("vision_und_enc_model.")}
    if stage == 3:
        assert not frozen


def test_loop_resumes_and_writes_a_loadable_checkpoint(tmp_path):
    cfg = dict(out=str(tmp_path / "run"), stage=1, steps=4, batch_size=2, lr=1e-3, warmup=1, ratio=(1, 1, 0),
               log_every=2, checkpoint_every=2)
    train(TrainConfig(**cfg), log=lambda m: None)
    train(TrainConfig(**{**cfg, "steps": 6}), log=lambda m: None)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    bundle = load_bundle(checkpoint=tmp_path / "run" / "checkpoint")
    assert bundle.vae is not None and bundle.processor is not None
    init = load_preset("tiny").model.state_dict()
    trained = bundle.model.state_dict()
    # Stage 1 trains only the new modules: the LLM and SigLIP in the checkpoint are the initial ones.
    up = "language_model.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(trained[up], init[up])
    assert not torch.equal(trained["vision_gen_dec_aligner.weight"], init["vision_gen_dec_aligner.weight"])


def test_bad_training_configs(tmp_path):
    from jfexport.core.errors import ConfigError

    with pytest.raises(ConfigError, match="stage"):
        TrainConfig(out="x", stage=4)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"out": "x", "learning_rate": 1}))
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_file(path)
    # Not JSON in three ways; each a ConfigError naming the file, none a traceback.
    for content in (b'{"out": ', b'{"out": "\xff\xfe"}', b"[" * 100_000):
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=r"c\.json: not valid JSON"):
            TrainConfig.from_file(path)


@pytest.mark.parametrize("key,value,message", [
    ("log_every", 0, "log_every: must be >= 1"), ("checkpoint_every", 0, "checkpoint_every: must be >= 1"),
    ("lr", -1.0, "lr: must be > 0"), ("warmup", -5, "warmup: must be >= 0"), ("seed", 2**64, "seed: must be in"),
    ("ema_decay", 2.0, "ema_decay: must be in"), ("prompt_drop", 5.0, "prompt_drop: must be in"),
    ("grad_clip", -1.0, "grad_clip: must be > 0"), ("logit_std", 0.0, "logit_std: must be > 0"),
    ("image_size", 0, "image_size: must be"), ("repa_layer", -5, "repa_layer: must be"),
    ("init", {}, "init: expected"), ("init", {"preset": "tiny", "extra": 1}, "init: expected"),
    ("ratio", (0, 0, 1), "stage 1 trains only the modules around the LLM"),
])
def test_config_values_out_of_range_are_named(key, value, message):
    """Each used to be met steps into training (a ZeroDivisionError, the optimizer's refusal) or trained with."""
    from jfexport.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        TrainConfig(out="x", **{key: value})


@pytest.mark.parametrize("key,value,message", [
    ("repa_layer", 99, r"repa_layer: 99, but the LLM has blocks 1 \.\. "),
    ("image_size", 7, "image_size: 7: the model's generation encoder cannot take images of this size"),
])
def test_config_values_the_model_cannot_take_are_named_before_anything_is_written(tmp_path, key, value, message):
    from jfexport.core.errors import ConfigError

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig(out=str(out), steps=1, batch_size=1, **{key: value}), log=lambda m: None)
    assert not out.exists()


def test_default_recipe_chains_vae_and_stages_and_resumes(tmp_path):
    from jfexport.reference.training.recipe import Recipe, StagePlan, train_default

    recipe = Recipe(vae_steps=2, stages=(StagePlan(1, 2, 1e-3, 1, (1, 1, 0)), StagePlan(3, 2, 1e-3, 1, (1, 1, 1))),
                    batch_size=2)
    final = train_default(tmp_path / "default", recipe=recipe, log=lambda m: None)
    bundle = load_bundle(checkpoint=final)
    assert bundle.vae is not None and bundle.processor is not None
    stage1 = load_bundle(checkpoint=tmp_path / "default" / "stage1" / "checkpoint").model.state_dict()
    trained = bundle.model.state_dict()
    # Stage 3 starts from stage 1's checkpoint and trains everything, the LLM included.
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trained[key], stage1[key])
    vae_weights = (tmp_path / "default" / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    messages: list[str] = []
    train_default(tmp_path / "default", recipe=recipe, log=messages.append)
    assert not any(m.startswith("VAE") for m in messages)  # a finished VAE is not retrained
    assert (tmp_path / "default" / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == vae_weights
