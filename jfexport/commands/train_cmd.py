"""`jfexport train CONFIG.json`: train (or resume) JanusFlow on the synthetic shapes data."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("train")
@click.argument("config", type=click.Path(path_type=Path))
def train_cmd(config):
    """Train a stage from a JSON config; resumes when the run folder holds a train state."""
    from jfexport.reference.training.config import TrainConfig
    from jfexport.reference.training.loop import train

    cfg = TrainConfig.from_file(config)
    last = train(cfg, log=lambda msg: click.echo(msg, err=True))
    click.echo(f"checkpoint (EMA weights, official layout): {Path(cfg.out) / 'checkpoint'}; last losses {last}")
