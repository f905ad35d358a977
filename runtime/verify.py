"""`jfexport verify`: end-to-end parity of built engines with the PyTorch reference.

Generation: the same prompts and noise through the full CFG Euler loop, compared on the final
latent (max abs error) and on the decoded images (PSNR). Understanding: greedy answers must be
token-identical, with the logit error of every step reported.

The bounds are those of the precision the runtime actually loaded (`EngineSet.precision`, chosen by
`load_engines`/`pick_precision`, e.g. fp16 on a GPU when the build has it), never a caller's guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from jfexport.reference.pipelines.generation import decode_latents
from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline

from .engines_folder import EnginesError
from .pipelines import JanusFlowRuntime

PROMPTS = ["a red circle at the top left", "two blue squares"]
QUESTIONS = ["What colour is the shape?", "Where is the shape?"]
# fp32 engines compute the reference function; fp16 engines are held to image quality instead.
LATENT_ATOL = {"fp32": 1e-3, "fp16": None}
MIN_PSNR_DB = {"fp32": 60.0, "fp16": 30.0}


@dataclass
class Check:
    name: str
    value: float | str
    bound: str
    ok: bool


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def loaded_precision(runtime: JanusFlowRuntime) -> str:
    """The build precision `runtime`'s engines were opened at (they come from `load_engines`)."""
    precision = getattr(runtime.engines, "precision", None)
    if precision not in LATENT_ATOL:
        raise EnginesError("verify checks engines opened from a build folder (JanusFlowRuntime.from_engines); "
                           f"these engines do not say their precision ({precision!r})")
    return precision


def verify(runtime: JanusFlowRuntime, reference: ReferencePipeline, steps: int = 30,
           cfg: float = 2.0, seed: int = 0, new_tokens: int = 16) -> list[Check]:
    """The checks, first the precision whose bounds apply (the one the engines were loaded at)."""
    precision = loaded_precision(runtime)
    checks: list[Check] = [Check("precision (as loaded)", precision, "sets bounds", True)]
    z_rt = runtime.generate_latents(PROMPTS, steps=steps, cfg=cfg, seed=seed)
    z_ref = reference.generate_latents(PROMPTS, steps=steps, cfg=cfg, seed=seed)
    err = (z_rt - z_ref).abs().max().item()
    atol = LATENT_ATOL[precision]
    checks.append(Check(f"latent max abs ({steps} steps)", err, f"<= {atol}" if atol else "reported",
                        math.isfinite(err) and (atol is None or err <= atol)))
    img_rt = runtime.engines["vae_decoder"].run({"latents": z_rt})["images"].float()
    img_ref = decode_latents(reference.bundle.vae, z_ref.to(reference.dtype)).float()
    value = psnr(img_rt, img_ref)
    checks.append(Check("image PSNR (dB)", value, f">= {MIN_PSNR_DB[precision]}", value >= MIN_PSNR_DB[precision]))

    images = [Image.new("RGB", (96, 64), (220, 30, 30)), Image.new("RGB", (64, 96), (30, 30, 220))]
    logits_rt: list[torch.Tensor] = []
    logits_ref: list[torch.Tensor] = []
    tok_rt = torch.stack(list(runtime.chat_stream(images, QUESTIONS, max_new_tokens=new_tokens, on_logits=logits_rt.append)))
    tok_ref = torch.stack(list(reference.chat_stream(images, QUESTIONS, max_new_tokens=new_tokens, on_logits=logits_ref.append)))
    same = tok_rt.shape == tok_ref.shape and torch.equal(tok_rt, tok_ref)
    checks.append(Check("greedy tokens identical", f"{tok_rt.shape[0]} steps" if same else "differ", "identical", same))
    steps_both = min(len(logits_rt), len(logits_ref))
    # Rows that have ended compute nothing more in the runtime (NaN there); compare the live ones.
    logit_err = max(((logits_rt[i] - logits_ref[i].float()).abs().nan_to_num(0.0).max().item()
                     for i in range(steps_both)), default=0.0)
    bound = 1e-3 if precision == "fp32" else 0.5
    checks.append(Check("logits max abs", logit_err, f"<= {bound}", logit_err <= bound))
    return checks


def format_checks(checks: list[Check]) -> str:
    rows = [f"{'check':<28} {'value':>14} {'bound':>12}  result"]
    for c in checks:
        value = f"{c.value:.3e}" if isinstance(c.value, float) and c.name != "image PSNR (dB)" else (
            f"{c.value:.1f}" if isinstance(c.value, float) else c.value)
        rows.append(f"{c.name:<28} {value:>14} {c.bound:>12}  {'ok' if c.ok else 'FAIL'}")
    return "\n".join(rows)
