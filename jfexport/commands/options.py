"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click


def model_options(f):
    f = click.option("--preset", default=None, help="Named model with random weights (tiny, janusflow-1.3b).")(f)
    f = click.option("--vae", type=click.Path(path_type=Path), default=None, help="diffusers AutoencoderKL folder.")(f)
    f = click.option(
        "--checkpoint", type=click.Path(path_type=Path), default=None,
        help="Checkpoint folder in the official layout (default: the bundled default model).",
    )(f)
    return f


def load_model(checkpoint, vae, preset):
    from jfexport.reference.bundle import load_bundle

    return load_bundle(checkpoint=checkpoint, vae=vae, preset=preset)
