"""Recompute the golden cases of the official implementation and compare (`jfexport verify-reference`).

A golden file (`golden.safetensors` + `golden_index.json`, format of ../shared/fixtures) holds
inputs and outputs of the official code. Every case present is recomputed from the inputs
alone; shapes and special ids come from the file, so any model config in that format works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from jfexport.core.errors import InputError

from .modules.janusflow import JanusFlowModel
from .pipelines.generation import sample_latents
from .pipelines.understanding import decode_tokens

# fp32 tolerance: the index measures equivalent-implementation noise at <= 7.4e-6 on logits/v/z,
# so 1e-4 leaves ~10x margin while real mistakes move outputs by 0.1-1.6. Intermediates are held
# to the same bound relative to their own scale (max(1, |ref|max)).
ATOL = 1e-4


@dataclass
class Comparison:
    name: str
    max_abs: float
    max_rel: float
    ref_absmax: float
    tolerance: float
    exact: bool = False  # integer tensors must match exactly

    @property
    def ok(self) -> bool:
        if self.exact:
            return self.max_abs == 0
        return self.max_abs <= self.tolerance


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, scaled: bool) -> Comparison:
    if got.shape != ref.shape:
        raise InputError(f"{name}: computed shape {tuple(got.shape)} != golden {tuple(ref.shape)}")
    if not ref.is_floating_point():
        diff = (got.long() != ref.long()).sum().item()
        return Comparison(name, float(diff), float(diff), 0.0, 0.0, exact=True)
    got, ref = got.double(), ref.double()
    err = (got - ref).abs()
    absmax = ref.abs().max().item() if ref.numel() else 0.0
    max_abs = err.max().item() if err.numel() else 0.0
    if not torch.isfinite(got).all():
        max_abs = float("inf")
    max_rel = (err / ref.abs().clamp_min(1e-6)).max().item() if err.numel() else 0.0
    tol = ATOL * max(1.0, absmax) if scaled else ATOL
    return Comparison(name, max_abs, max_rel, absmax, tol)


class GoldenFile:
    def __init__(self, path: str | Path):
        path = Path(path)
        index_path = path.with_name("golden_index.json") if path.suffix == ".safetensors" else path / "golden_index.json"
        data_path = path if path.suffix == ".safetensors" else path / "golden.safetensors"
        for p in (data_path, index_path):
            if not p.is_file():
                raise InputError(f"{p}: golden file not found")
        try:
            self.index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{index_path}: not valid JSON ({e})") from None
        if not isinstance(self.index, dict):
            raise InputError(f"{index_path}: expected a JSON object")
        try:
            self.tensors = load_file(str(data_path))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise InputError(f"{data_path}: not a readable safetensors file ({e})") from None
        self.special = self.index.get("special_ids", {})

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.tensors)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def _check_und(model: JanusFlowModel, g: GoldenFile, out: list[Comparison]) -> None:
    ids, pixels = g["und.input_ids"], g["und.pixel_values"]
    seq_mask, emb_mask = g["und.images_seq_mask"], g["und.images_emb_mask"]
    attn = g["und.attention_mask"]
    features = model.vision_und_enc_model(pixels.flatten(0, 1))
    rows = g["und.vision_rows"]
    out.append(compare("und.vision_features", features[:, rows], g["und.vision_features"], True))
    image_embeds = model.encode_images(pixels.flatten(0, 1))
    out.append(compare("und.image_embeds", image_embeds[:, g["und.image_embeds_rows"]], g["und.image_embeds"], True))
    embeds = model.prepare_inputs_embeds(ids, pixels, seq_mask, emb_mask)
    out.append(compare("und.inputs_embeds", embeds[:, g["und.inputs_embeds_pos"]], g["und.inputs_embeds"], True))
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    hidden, _, _ = model.llm(embeds, attn, positions)
    out.append(compare("und.logits", model.logits(hidden), g["und.logits"], False))
    scores: list[torch.Tensor] = []
    n_new = g["und.greedy_ids"].shape[1]
    tokens = list(decode_tokens(model, embeds, attn, n_new, int(g.special["eos"]), on_logits=scores.append))
    greedy = torch.stack(tokens, dim=1)
    # A golden run may stop early at EOS; compare the tokens both produced.
    out.append(compare("und.greedy_ids", greedy, g["und.greedy_ids"][:, : greedy.shape[1]], False))
    out.append(compare("und.greedy_scores", torch.stack(scores, 1), g["und.greedy_scores"][:, : len(scores)], False))


def _check_gen(model: JanusFlowModel, g: GoldenFile, out: list[Comparison]) -> None:
    prompts = g["gen.prompt_ids"]
    batch = prompts.shape[0]
    cfg = float(g["gen.cfg_weight"].item()) if "gen.cfg_weight" in g.tensors else float(g.index["cfg_weight"])
    steps = int(g.index["num_inference_steps"])
    pad = int(g.special["pad"])
    seen: dict[str, torch.Tensor] = {}
    z = sample_latents(
        model, prompts, torch.ones_like(prompts), g["gen.z0"], steps, cfg, pad, schedule="cached",
        observe=lambda name, t: seen.__setitem__(name, t.clone()),
    )
    out.append(compare("gen.tokens(uncond rows)", _uncond_tokens(prompts, pad), g["gen.tokens"], False))
    pos_rows = g["gen.step0.pos_rows"] if "gen.step0.pos_rows" in g.tensors else None
    for k in range(steps):
        for what in ("t", "v", "z"):
            key = f"gen.step{k}.{what}"
            if key in g.tensors:
                out.append(compare(key, seen[f"step{k}.{what}"], g[key], what == "t"))
    out.append(compare("gen.z_final", z, g["gen.z_final"], False))
    step0: dict[str, Callable[[], torch.Tensor]] = {
        "t_emb": lambda: seen["step0.t_emb"],
        "v_raw": lambda: seen["step0.v_raw"],
    }
    if pos_rows is not None:
        img = pos_rows[1:] - 1
        hidden = seen["step0.last_hidden"]
        step0["last_hidden"] = lambda: hidden[:, pos_rows]
        step0["enc_out"] = lambda: seen["step0.enc_out"][:batch].flatten(2)[:, :, img]
        step0["z_emb_aligned"] = lambda: seen["step0.z_emb_aligned"][:batch, img]
        step0["dec_in"] = lambda: (model.vision_gen_dec_aligner(model.vision_gen_dec_aligner_norm(hidden[:, 1:]))[:, img]
                                   .transpose(1, 2))
    for what, fn in step0.items():
        key = f"gen.step0.{what}"
        if key in g.tensors:
            out.append(compare(key, fn(), g[key], what not in ("v_raw",)))


def _uncond_tokens(prompts: torch.Tensor, pad: int) -> torch.Tensor:
    uncond = prompts.clone()
    uncond[:, 1:] = pad
    return torch.cat([prompts, uncond])


def _check_encdec(model: JanusFlowModel, g: GoldenFile, out: list[Comparison]) -> None:
    x_emb, t_emb = model.vision_gen_enc_model(g["encdec.z"], g["encdec.t"])
    out.append(compare("encdec.enc_x_emb", x_emb, g["encdec.enc_x_emb"], True))
    out.append(compare("encdec.enc_t_emb", t_emb, g["encdec.enc_t_emb"], True))
    dec = model.vision_gen_dec_model(g["encdec.dec_x"], g["encdec.enc_x_emb"], g["encdec.enc_t_emb"])
    out.append(compare("encdec.dec_out", dec, g["encdec.dec_out"], False))


@torch.no_grad()
def verify_golden(model: JanusFlowModel, golden: GoldenFile) -> list[Comparison]:
    model = model.float().eval()
    results: list[Comparison] = []
    for prefix, check in (("und.", _check_und), ("gen.", _check_gen), ("encdec.", _check_encdec)):
        if golden.has(prefix):
            check(model, golden, results)
    if not results:
        raise InputError("golden file holds no und.*, gen.* or encdec.* case")
    return results


def format_table(results: list[Comparison]) -> str:
    lines = [f"{'tensor':<28} {'max abs':>11} {'max rel':>11} {'|ref| max':>10} {'tolerance':>10}  result"]
    for r in results:
        if r.exact:
            lines.append(f"{r.name:<28} {int(r.max_abs):>11d} {'':>11} {'':>10} {'exact':>10}  {'ok' if r.ok else 'FAIL'}")
        else:
            lines.append(
                f"{r.name:<28} {r.max_abs:>11.3e} {r.max_rel:>11.3e} {r.ref_absmax:>10.3g} {r.tolerance:>10.1e}  "
                f"{'ok' if r.ok else 'FAIL'}"
            )
    return "\n".join(lines)
