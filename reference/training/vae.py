"""Train the tiny AutoencoderKL of the default model on the synthetic images.

L1 reconstruction (shape pixels weighted up) plus a small KL term, then the latent scaling factor is set to 1/std of the
training latents (as SD-family VAEs do) so the flow sees unit-variance data.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL

from jfexport.core.presets import preset_vae_config

from .toy_data import render, split_scenes

KL_WEIGHT = 1e-6
# The shapes cover ~10% of a mostly white image; unweighted, the reconstruction loss is content
# with the right outline in a wrong colour (measured: red and green decoded as yellow).
FOREGROUND_WEIGHT = 10.0


def _batch(scenes, size: int, n: int, rng: random.Random) -> torch.Tensor:
    images = [np.asarray(render(rng.choice(scenes), size, rng), dtype=np.float32) for _ in range(n)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_vae(out: Path, image_size: int, steps: int, seed: int = 0, batch: int = 16, lr: float = 2e-3,
              log: Callable[[str], None] = print) -> AutoencoderKL:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    scenes, _ = split_scenes(seed)
    vae = AutoencoderKL(**preset_vae_config("tiny"))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(1, steps + 1):
        x = _batch(scenes, image_size, batch, rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        weight = 1.0 + FOREGROUND_WEIGHT * (x < 0.99).any(dim=1, keepdim=True).float()
        loss = (weight * (recon - x).abs()).mean() / weight.mean() + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"vae step {step}/{steps}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(_batch(scenes, image_size, 256, rng)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(out)
    return vae
