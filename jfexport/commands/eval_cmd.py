"""`jfexport eval`: mini-GenEval and understanding accuracy on held-out toy scenes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import open_pipeline, runtime_options
from .output_files import check_json_target, write_json


@click.command("eval")
@runtime_options
@click.option("--images-per-prompt", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images generated per held-out caption.")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True, help="Euler steps per image.")
@click.option("--cfg", default=2.0, show_default=True, help="Classifier-free guidance weight.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the scores here.")
def eval_cmd(engines, backend, precision, verify_files, checkpoint, vae, preset, images_per_prompt, steps, cfg, json_path):
    """Score generation (colour, shape, position, count) and understanding on held-out scenes."""
    from jfexport.reference.eval.evaluate import evaluate

    check_json_target(json_path)
    pipe = open_pipeline(engines, backend, precision, checkpoint, vae, preset, verify_files=verify_files)
    result = evaluate(pipe, pipe.processor.image_size, images_per_prompt=images_per_prompt, steps=steps, cfg=cfg)
    text = json.dumps(result.to_json(), indent=2)
    click.echo(text)
    if json_path is not None:
        write_json(json_path, text)
