"""`jfexport train CONFIG.json` (one stage) and `jfexport train-default OUT` (the default model's recipe)."""

from __future__ import annotations

from pathlib import Path

import click

from .output_files import ensure_writable_folder, say


@click.command("train")
@click.argument("config", type=click.Path(path_type=Path))
def train_cmd(config):
    """Train a stage from a JSON config; resumes when the run folder holds a train state."""
    from jfexport.reference.training.config import TrainConfig
    from jfexport.reference.training.loop import train

    cfg = TrainConfig.from_file(config)
    ensure_writable_folder(Path(cfg.out), f"{config}: out")
    last = train(cfg, log=lambda msg: click.echo(msg, err=True))
    say(f"checkpoint (EMA weights, official layout): {Path(cfg.out) / 'checkpoint'}; last losses {last}")


@click.command("train-default")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the weights init, data and noise.")
def train_default_cmd(out, seed):
    """Train the bundled default model from scratch: tiny VAE, then stages 1 and 3 (resumable)."""
    from jfexport.reference.training.recipe import train_default

    ensure_writable_folder(out, "OUT")
    final = train_default(out, seed, log=lambda msg: click.echo(msg, err=True))
    say(f"default model (official layout, with vae/ and tokenizer): {final}")
