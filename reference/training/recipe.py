"""The recipe of the bundled default model: a tiny VAE, then JanusFlow's stages on the toy data.

Deterministic from a seed and sized for a 2-core CPU (the whole recipe is meant to finish in
under 30 minutes). The toy model starts from random weights, so unlike the paper there is no
pretrained LLM or SigLIP to protect: stage 1 only warms up the new modules before stage 3
trains everything (stage 2 differs from 3 only by freezing the understanding encoder).
Every part resumes: running the recipe again continues where it stopped.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .loop import CHECKPOINT, train
from .vae import train_vae


@dataclass(frozen=True)
class StagePlan:
    stage: int
    steps: int
    lr: float
    warmup: int
    ratio: tuple[int, int, int]  # understanding : generation : text


@dataclass(frozen=True)
class Recipe:
    vae_steps: int = 900
    vae_batch: int = 8
    vae_lr: float = 2e-3
    stages: tuple[StagePlan, ...] = (
        StagePlan(1, 300, 2e-3, 50, (40, 60, 0)),
        StagePlan(3, 8000, 1e-3, 200, (30, 60, 10)),
    )
    batch_size: int = 16
    repa_layer: int | None = 1
    repa_weight: float = 0.5
    ema_decay: float = 0.99


def train_default(out: str | Path, seed: int = 0, recipe: Recipe = Recipe(), log: Callable[[str], None] = print) -> Path:
    """Train the whole recipe into `out`; returns the final checkpoint folder (`out/model`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae_dir = out / "vae"
    if not (vae_dir / "config.json").is_file():
        log(f"VAE: {recipe.vae_steps} steps")
        partial = out / "vae.tmp"  # an interrupted VAE run must not look finished
        shutil.rmtree(partial, ignore_errors=True)
        train_vae(partial, 64, recipe.vae_steps, seed=seed, batch=recipe.vae_batch, lr=recipe.vae_lr, log=log)
        shutil.rmtree(vae_dir, ignore_errors=True)
        partial.rename(vae_dir)
    init: dict = {"preset": "tiny"}
    for plan in recipe.stages:
        run = out / f"stage{plan.stage}"
        log(f"stage {plan.stage}: {plan.steps} steps, lr {plan.lr}, und:gen:text {plan.ratio}")
        cfg = TrainConfig(out=str(run), stage=plan.stage, steps=plan.steps, batch_size=recipe.batch_size, lr=plan.lr,
                          warmup=plan.warmup, ratio=plan.ratio, init=init, vae=str(vae_dir), repa_layer=recipe.repa_layer,
                          repa_weight=recipe.repa_weight, ema_decay=recipe.ema_decay, seed=seed + plan.stage,
                          log_every=100, checkpoint_every=500)
        train(cfg, log=log)
        init = {"checkpoint": str(run / CHECKPOINT)}
    final = out / "model"
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init["checkpoint"], tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
