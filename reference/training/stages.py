"""Training stages and what each trains (paper Fig. 3, Table 1). The VAE is always frozen."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..modules.janusflow import JanusFlowModel

# Modules JanusFlow adds around the pretrained LLM and SigLIP: trained alone in stage 1.
NEW_MODULES = ("vision_und_enc_aligner", "beg_of_und_embed", "vision_gen_enc_model", "vision_gen_enc_aligner",
               "vision_gen_dec_model", "vision_gen_dec_aligner_norm", "vision_gen_dec_aligner")


@dataclass(frozen=True)
class StageDefaults:
    lr: float
    warmup: int
    steps: int
    batch: int
    ratio: tuple[int, int, int]  # understanding : generation : text


# Paper Table 1 (the 1.3B run); configs override steps/batch for small runs.
STAGES = {
    1: StageDefaults(1e-4, 2000, 10_000, 512, (50, 50, 0)),
    2: StageDefaults(1e-4, 2000, 390_000, 512, (14, 80, 6)),
    3: StageDefaults(2e-5, 1000, 26_000, 256, (21, 70, 9)),
}


def trainable_names(model: JanusFlowModel, stage: int) -> set[str]:
    if stage not in STAGES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    names = {n for n, _ in model.named_parameters()}
    if stage == 1:
        return {n for n in names if n.startswith(NEW_MODULES)}
    if stage == 2:
        return {n for n in names if not n.startswith("vision_und_enc_model.")}
    return names


def apply_stage(model: JanusFlowModel, repa_head: nn.Module | None, stage: int) -> list[nn.Parameter]:
    """Set requires_grad for `stage`; returns the trainable parameters (h_phi always trains)."""
    train = trainable_names(model, stage)
    for name, param in model.named_parameters():
        param.requires_grad_(name in train)
    params = [p for p in model.parameters() if p.requires_grad]
    if repa_head is not None:
        repa_head.requires_grad_(True)
        params += list(repa_head.parameters())
    return params
