"""The training loop: mixed understanding / generation / text batches at the stage's ratio,
AdamW(0.9, 0.95) without weight decay, gradient clipping, warmup then constant LR, EMA, JSONL
logs, and resumable checkpoints whose weights (the EMA ones) are in the official layout.
The resume state is safetensors + JSON (state_io), never a pickle."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from jfexport.core.errors import CheckpointError, ConfigError

from ..bundle import ModelBundle, load_bundle
from ..checkpoint import save_checkpoint
from .config import TrainConfig
from .ema import EMA
from .losses import RepaHead
from .objectives import generation_loss, text_loss, understanding_loss
from .stages import apply_stage
from .state_io import load_state, save_state
from .toy_data import QUESTIONS, Scene, render, split_scenes

KINDS = ("understanding", "generation", "text")
STATE = "train_state.safetensors"
# Written by earlier versions with torch.save; never unpickled (that can run code), only reported.
PICKLED_STATE = "train_state.pt"
CHECKPOINT = "checkpoint"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                   "preprocessor_config.json")


class ToyBatches:
    """Batches of the synthetic shapes data, drawn from the training scenes only."""

    def __init__(self, image_size: int, seed: int):
        self.scenes, self.held_out = split_scenes(seed)
        self.size = image_size
        self.rng = random.Random(seed)

    def _scenes(self, n: int) -> list[Scene]:
        return [self.rng.choice(self.scenes) for _ in range(n)]

    def generation(self, n: int) -> tuple[list[str], torch.Tensor]:
        scenes = self._scenes(n)
        images = [render(s, self.size, self.rng) for s in scenes]
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])
        return [s.caption for s in scenes], pixels.permute(0, 3, 1, 2) / 127.5 - 1.0

    def understanding(self, n: int):
        scenes = self._scenes(n)
        attrs = [self.rng.choice(list(QUESTIONS)) for _ in scenes]
        return ([render(s, self.size, self.rng) for s in scenes], [QUESTIONS[a] for a in attrs],
                [s.answer(a) for s, a in zip(scenes, attrs)])

    def text(self, n: int) -> list[str]:
        return [s.caption for s in self._scenes(n)]


def _load_init(cfg: TrainConfig) -> ModelBundle:
    bundle = load_bundle(checkpoint=cfg.init.get("checkpoint"), preset=cfg.init.get("preset"), vae=cfg.vae)
    if bundle.vae is None:
        raise ConfigError("training needs a VAE: set 'vae' in the config or use a checkpoint with a vae/ folder")
    return bundle


def _save(bundle: ModelBundle, ema: EMA, out: Path) -> None:
    """Official-layout checkpoint with the EMA weights, plus the tokenizer and the frozen VAE."""
    model = bundle.model
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.copy_to(model)
    try:
        extra = [bundle.processor_folder / f for f in PROCESSOR_FILES
                 if bundle.processor_folder and (bundle.processor_folder / f).is_file()]
        save_checkpoint(model, out / CHECKPOINT, dtype=torch.float32, extra_files=extra)
        bundle.require_vae().save_pretrained(out / CHECKPOINT / "vae")
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(raw[n])


def _check_against_model(cfg: TrainConfig, model, vae) -> None:
    """What the config asks of the model, checked before anything is written: the REPA block exists, and the
    generation encoder takes toy images of the size asked (tried on one blank image)."""
    layers = model.config.language.num_hidden_layers
    if cfg.repa_layer is not None and not 1 <= cfg.repa_layer <= layers:
        raise ConfigError(f"repa_layer: {cfg.repa_layer}, but the LLM has blocks 1 .. {layers}")
    if cfg.image_size is not None:
        with torch.no_grad():
            try:
                latents = vae.encode(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).latent_dist.mean
                model.gen_encode(latents, torch.zeros(1))
            except RuntimeError as e:
                raise ConfigError(f"image_size: {cfg.image_size}: the model's generation encoder cannot take images "
                                  f"of this size ({str(e).splitlines()[0]})") from None


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, float]:
    """Run (or resume) a training; returns the last logged losses."""
    out = Path(cfg.out)
    if (out / PICKLED_STATE).is_file() and not (out / STATE).is_file():
        raise CheckpointError(
            f"{out / PICKLED_STATE}: a pickled training state (older jfexport); it is not loaded because unpickling "
            f"can run code. Delete it to start this run afresh"
        )
    torch.manual_seed(cfg.seed)
    bundle = _load_init(cfg)
    model, vae, processor = bundle.model.float().train(), bundle.require_vae().float().eval(), bundle.require_processor()
    vae.requires_grad_(False)
    lang, und = model.config.language, model.config.vision_und
    _check_against_model(cfg, model, vae)
    out.mkdir(parents=True, exist_ok=True)
    repa = RepaHead(lang.hidden_size, und.width) if cfg.repa_layer is not None else None
    params = apply_stage(model, repa, cfg.stage)
    lr, warmup = cfg.lr, cfg.warmup
    if lr is None or warmup is None:  # TrainConfig.__post_init__ fills both from the stage
        raise ConfigError(f"stage {cfg.stage}: no learning rate or warmup resolved")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    ema = EMA(model, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = ToyBatches(cfg.image_size or und.image_size, cfg.seed)
    kind_rng = random.Random(cfg.seed + 1)
    step = 0
    state_path = out / STATE
    if state_path.is_file():
        state = load_state(state_path)
        try:
            model.load_state_dict(state["model"])
            if repa is not None and state.get("repa") is not None:
                repa.load_state_dict(state["repa"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            ema.load_state_dict(state["ema"])
            gen.set_state(state["generator"])
            kind_rng.setstate(state["kind_rng"])
            data.rng.setstate(state["data_rng"])
            step = int(state["step"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{state_path}: does not fit this run ({type(e).__name__}: {e})") from None
        log(f"resumed {out} at step {step}")
    (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    last: dict[str, float] = {}
    start = time.perf_counter()
    with open(out / "log.jsonl", "a") as log_file:
        while step < cfg.steps:
            kind = kind_rng.choices(KINDS, weights=cfg.ratio)[0]
            if kind == "generation":
                prompts, images = data.generation(cfg.batch_size)
                parts = generation_loss(model, vae, processor, prompts, images, gen, cfg.prompt_drop, cfg.logit_mean,
                                        cfg.logit_std, repa, cfg.repa_layer)
                loss = parts["rf"] + cfg.repa_weight * parts.get("repa", torch.zeros(()))
            elif kind == "understanding":
                parts = understanding_loss(model, processor, *data.understanding(cfg.batch_size))
                loss = parts["ar"]
            else:
                parts = text_loss(model, processor, data.text(cfg.batch_size))
                loss = parts["text"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            ema.update(model)
            step += 1
            last = {k: float(v.detach()) for k, v in parts.items()}
            log_file.write(json.dumps({"step": step, "kind": kind, "lr": scheduler.get_last_lr()[0], **last}) + "\n")
            if step % cfg.log_every == 0 or step == cfg.steps:
                log(f"step {step}/{cfg.steps} {kind}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items())
                    + f" ({time.perf_counter() - start:.0f}s)")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save(bundle, ema, out)
                save_state(state_path, {
                    "model": model.state_dict(), "repa": repa.state_dict() if repa else None,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "ema": ema.state_dict(),
                    "generator": gen.get_state(), "kind_rng": kind_rng.getstate(), "data_rng": data.rng.getstate(),
                    "step": step,
                })
    return last
