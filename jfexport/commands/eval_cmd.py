"""`jfexport eval`: mini-GenEval and understanding accuracy on held-out toy scenes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from jfexport import defaults

from .options import ENGINE_PRECISIONS, open_pipeline, runtime_options
from .output_files import check_json_target, say, write_json


@click.command("eval")
@runtime_options
@click.option("--images-per-prompt", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images generated per held-out caption.")
@click.option("--steps", type=click.IntRange(min=1), default=defaults.STEPS, show_default=True, help="Euler steps per image.")
@click.option("--cfg", default=defaults.CFG, show_default=True, help="Classifier-free guidance weight.")
@click.option("--against", type=click.Choice(ENGINE_PRECISIONS), default=None,
              help="Also score the build's engines at this precision and fail if --precision's accuracies are more "
                   "than 0.05 below them (e.g. --precision int8 --against fp32).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the scores here.")
def eval_cmd(engines, backend, precision, verify_files, checkpoint, vae, preset, images_per_prompt, steps, cfg, against,
             json_path):
    """Score generation (colour, shape, position, count) and understanding on held-out scenes."""
    from jfexport.reference.eval.evaluate import MAX_ACCURACY_DROP, accuracy_drops, evaluate

    check_json_target(json_path)
    if against is not None and engines is None:
        raise click.UsageError("--against compares two precisions of one build: pass --engines DIR")
    pipe = open_pipeline(engines, backend, precision, checkpoint, vae, preset, verify_files=verify_files)
    # Both opened before either is scored: a precision the build lacks is named before minutes of evaluation.
    base = (open_pipeline(engines, backend, against, checkpoint, vae, preset, verify_files=verify_files)
            if against is not None else None)
    result = evaluate(pipe, pipe.processor.image_size, images_per_prompt=images_per_prompt, steps=steps, cfg=cfg)
    report = result.to_json()
    failed = []
    if base is not None:
        baseline = evaluate(base, base.processor.image_size, images_per_prompt=images_per_prompt, steps=steps, cfg=cfg)
        drops = accuracy_drops(result, baseline)
        failed = [name for name, drop in drops.items() if drop > MAX_ACCURACY_DROP]
        report = {"precision": precision or "default", **report, "against": {"precision": against, **baseline.to_json()},
                  "accuracy_drop": drops, "max_accuracy_drop": MAX_ACCURACY_DROP, "ok": not failed}
    text = json.dumps(report, indent=2)
    say(text)
    if json_path is not None:
        write_json(json_path, text)
    if failed:
        raise click.ClickException(f"{', '.join(failed)}: more than {MAX_ACCURACY_DROP} below the {against} engines'")
