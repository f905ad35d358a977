"""REPA ablation at toy scale: the same stage-3 budget with and without L_REPA, from the same start.

Usage: python scripts/repa_ablation.py START_CHECKPOINT OUT_DIR [--steps 3000] [--every 500]

Both runs resume from START_CHECKPOINT (e.g. the stage-1 checkpoint of `jfexport train-default`)
with identical data order and seeds; every `--every` steps the EMA checkpoint is scored by the
toy evaluation. Writes OUT_DIR/repa_ablation.json (losses per step and scores per checkpoint).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from jfexport.reference.bundle import load_bundle
from jfexport.reference.eval.evaluate import evaluate
from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
from jfexport.reference.training.config import TrainConfig
from jfexport.reference.training.loop import CHECKPOINT, train
from jfexport.reference.training.recipe import Recipe


def run(name: str, start: Path, out: Path, steps: int, every: int, repa_layer: int | None, vae: str) -> dict:
    recipe = Recipe()
    final = recipe.stages[-1]
    scores = []
    for upto in range(every, steps + 1, every):
        cfg = TrainConfig(out=str(out / name), stage=final.stage, steps=upto, batch_size=recipe.batch_size, lr=final.lr,
                          warmup=final.warmup, ratio=final.ratio, init={"checkpoint": str(start)}, vae=vae,
                          repa_layer=repa_layer, repa_weight=recipe.repa_weight, ema_decay=recipe.ema_decay,
                          seed=final.stage, log_every=every, checkpoint_every=every)
        train(cfg, log=print)
        bundle = load_bundle(checkpoint=out / name / CHECKPOINT)
        result = evaluate(ReferencePipeline(bundle), bundle.image_size)
        scores.append({"step": upto, **result.to_json()})
        print(name, scores[-1])
    log = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
    rf = [(e["step"], e["rf"]) for e in log if "rf" in e]
    window = every
    curve = [{"step": s, "rf_mean": statistics.mean(v for t, v in rf if s - window < t <= s)}
             for s in range(window, steps + 1, window)]
    return {"scores": scores, "rf_loss": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("start", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=500)
    args = parser.parse_args()
    vae = str(args.start / "vae")
    results = {name: run(name, args.start, args.out, args.steps, args.every, layer, vae)
               for name, layer in (("with_repa", Recipe().repa_layer), ("without_repa", None))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "repa_ablation.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
