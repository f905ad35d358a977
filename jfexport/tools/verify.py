"""`jfexport verify`: end-to-end parity of built engines with the PyTorch reference.

Generation: the same prompts and noise through the full CFG Euler loop, compared on the final
latent (max abs error; for INT8 also the relative RMS error) and on the decoded images (PSNR).
Understanding: greedy answers must be token-identical (fp32, fp16), with the logit error of every
step reported; INT8 engines are held to a share of identical greedy tokens over 64 tokens instead,
with the logit error measured over the steps before the first differing token (after it the two
answers are different texts, and their logits are not comparable). No output may be NaN or Inf.

The bounds are those of the precision the runtime actually loaded (`EngineSet.precision`, chosen by
`load_engines`/`pick_precision`, e.g. fp16 on a GPU when the build has it), never a caller's guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from jfexport.core.manifest import EnginesError
from jfexport.reference.pipelines.generation import decode_latents
from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
from jfexport.runtime.pipelines import JanusFlowRuntime

PROMPTS = ["a red circle at the top left", "two blue squares"]
# INT8 bounds (docs/int8.md). Measured with 30 steps: final latent 1.0% / 1.6% (relative RMS) off
# the fp32 reference and images at 53.1 / 47.8 dB on the bundled model and the small preset, greedy
# tokens 1.0 / 1.0 identical; the bounds leave room for other weights and sit far from what a broken
# calibration gives (one layer's range off by 1000x: > 10% on one graph output already). The tiny
# preset's random weights give near-tied logits: 0.78-0.93 of its greedy tokens agree (a row flips at
# a tie and differs from there on), so its int8 build can fail the token check; latent and images
# pass (0.2%, 72 dB).
INT8_MIN_PSNR_DB = 25.0
INT8_MAX_LATENT_REL = 0.15  # ||z_int8 - z_fp32|| / ||z_fp32|| after the full loop
INT8_MIN_TOKEN_AGREEMENT = 0.9  # share of greedy tokens equal to the reference's, position by position
INT8_MAX_LOGIT_REL = 0.1  # max |logit error| / max |logit|, over the steps before the first differing token
QUESTIONS = ["What colour is the shape?", "Where is the shape?"]
# fp32 engines compute the reference function; fp16 and int8 engines are held to image quality instead.
LATENT_ATOL = {"fp32": 1e-3, "fp16": None, "int8": None}
MIN_PSNR_DB = {"fp32": 60.0, "fp16": 30.0, "int8": INT8_MIN_PSNR_DB}
NEW_TOKENS = {"fp32": 16, "fp16": 16, "int8": 64}


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


@dataclass
class Outputs:
    """What one pipeline computed for verify's fixed requests."""

    latents: torch.Tensor  # final latents of PROMPTS
    images: torch.Tensor  # those latents decoded, in [-1, 1]
    tokens: torch.Tensor  # [steps, rows] greedy answers to QUESTIONS
    logits: list[torch.Tensor]  # per step, [rows, V]


def measure(pipe: JanusFlowRuntime | ReferencePipeline, steps: int = 30, cfg: float = 2.0, seed: int = 0,
            new_tokens: int = 16) -> Outputs:
    """Run verify's requests through `pipe` (engines, or the PyTorch reference)."""
    latents = pipe.generate_latents(PROMPTS, steps=steps, cfg=cfg, seed=seed)
    if isinstance(pipe, ReferencePipeline):
        images = decode_latents(pipe.bundle.vae, latents.to(pipe.dtype)).float()
    else:
        images = pipe.engines["vae_decoder"].run({"latents": latents})["images"].float()
    chat_images = [Image.new("RGB", (96, 64), (220, 30, 30)), Image.new("RGB", (64, 96), (30, 30, 220))]
    logits: list[torch.Tensor] = []
    tokens = torch.stack(list(pipe.chat_stream(chat_images, QUESTIONS, max_new_tokens=new_tokens, on_logits=logits.append)))
    return Outputs(latents, images, tokens, logits)


def compare(precision: str, got: Outputs, ref: Outputs, steps: int = 30, new_tokens: int | None = None) -> list[Check]:
    """The checks of `got` (engines loaded at `precision`) against `ref`, first the precision whose bounds apply."""
    checks: list[Check] = [Check("precision (as loaded)", precision, "sets bounds", True)]
    z_rt, z_ref = got.latents, ref.latents
    err = (z_rt - z_ref).abs().max().item()
    atol = LATENT_ATOL[precision]
    checks.append(Check(f"latent max abs ({steps} steps)", err, f"<= {atol}" if atol else "reported",
                        math.isfinite(err) and (atol is None or err <= atol)))
    if precision == "int8":
        rel = ((z_rt - z_ref).norm() / z_ref.norm()).item()
        checks.append(Check("latent rel RMS", rel, f"<= {INT8_MAX_LATENT_REL}", rel <= INT8_MAX_LATENT_REL))
    value = psnr(got.images, ref.images)
    checks.append(Check("image PSNR (dB)", value, f">= {MIN_PSNR_DB[precision]}", value >= MIN_PSNR_DB[precision]))
    tok_rt, tok_ref, logits_rt, logits_ref = got.tokens, ref.tokens, got.logits, ref.logits
    # Rows that have ended carry all-NaN logits by contract (`chat_stream`); any other non-finite value fails.
    finite = all(bool(torch.isfinite(t).all()) for t in (z_rt, got.images)) and all(
        bool((torch.isfinite(x).all(1) | torch.isnan(x).all(1)).all()) for x in logits_rt)
    checks.append(Check("no NaN/Inf", "none" if finite else "found", "none", finite))
    steps_both = min(len(logits_rt), len(logits_ref))
    if precision == "int8":
        n = min(tok_rt.shape[0], tok_ref.shape[0])
        agree = (tok_rt[:n] == tok_ref[:n]).float().mean().item() if n else 0.0
        # Answers of different lengths (one stopped at EOS) disagree over the difference.
        agree *= n / max(tok_rt.shape[0], tok_ref.shape[0], 1)
        checks.append(Check(f"greedy token agreement ({new_tokens or NEW_TOKENS['int8']})", agree,
                            f">= {INT8_MIN_TOKEN_AGREEMENT}", agree >= INT8_MIN_TOKEN_AGREEMENT))
        differ = (tok_rt[:n] != tok_ref[:n]).any(dim=1).nonzero()
        steps_both = min(steps_both, int(differ[0]) + 1 if len(differ) else steps_both)
        logit_err = max(_rel_max(logits_rt[i], logits_ref[i].float()) for i in range(steps_both))
        checks.append(Check("logits rel max (agreeing)", logit_err, f"<= {INT8_MAX_LOGIT_REL}",
                            logit_err <= INT8_MAX_LOGIT_REL))
        return checks
    same = tok_rt.shape == tok_ref.shape and torch.equal(tok_rt, tok_ref)
    checks.append(Check("greedy tokens identical", f"{tok_rt.shape[0]} steps" if same else "differ", "identical", same))
    logit_err = max((_abs_max(logits_rt[i], logits_ref[i].float()) for i in range(steps_both)), default=0.0)
    bound = 1e-3 if precision == "fp32" else 0.5
    checks.append(Check("logits max abs", logit_err, f"<= {bound}", logit_err <= bound))
    return checks


def verify(runtime: JanusFlowRuntime, reference: JanusFlowRuntime | ReferencePipeline, steps: int = 30,
           cfg: float = 2.0, seed: int = 0, new_tokens: int | None = None,
           progress: Callable[[str], None] = lambda msg: None) -> list[Check]:
    """The checks, first the precision whose bounds apply (the one the engines were loaded at);
    `new_tokens` defaults to the precision's (NEW_TOKENS). `reference` is the PyTorch reference, or
    fp32 engines already held to it (the INT8 build's own gate)."""
    precision = loaded_precision(runtime)
    new_tokens = NEW_TOKENS[precision] if new_tokens is None else new_tokens
    what = f"an image ({steps} Euler steps, cfg {cfg:g}, seed {seed}) and {new_tokens} greedy tokens"
    progress(f"the engines ({precision}): {what}")
    engines = measure(runtime, steps, cfg, seed, new_tokens)
    progress(f"the reference: {what}")
    return compare(precision, engines, measure(reference, steps, cfg, seed, new_tokens), steps, new_tokens)


PLAIN_VALUES = {"image PSNR (dB)": ".1f", f"greedy token agreement ({NEW_TOKENS['int8']})": ".3f"}  # else .3e


def _live(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Rows still answering in both (the runtime's ended rows are NaN; the "no NaN/Inf" check
    fails any other non-finite value)."""
    return torch.isfinite(got).all(1) & torch.isfinite(ref).all(1)


def _abs_max(got: torch.Tensor, ref: torch.Tensor) -> float:
    live = _live(got, ref)
    return (got[live] - ref[live]).abs().max().item() if live.any() else 0.0


def _rel_max(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| over the live rows."""
    live = _live(got, ref)
    if not live.any():
        return 0.0
    return ((got[live] - ref[live]).abs().max() / ref[live].abs().max()).item()


def format_checks(checks: list[Check]) -> str:
    rows = [f"{'check':<28} {'value':>14} {'bound':>12}  result"]
    for c in checks:
        value = format(c.value, PLAIN_VALUES.get(c.name, ".3e")) if isinstance(c.value, float) else c.value
        rows.append(f"{c.name:<28} {value:>14} {c.bound:>12}  {'ok' if c.ok else 'FAIL'}")
    return "\n".join(rows)
