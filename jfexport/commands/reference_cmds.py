"""`jfexport verify-reference`: the reference against golden outputs of the official code."""

from __future__ import annotations

from pathlib import Path

import click

from .output_files import say


@click.command("verify-reference")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="config.json + weights.")
@click.option("--golden", type=click.Path(path_type=Path), required=True, help="golden.safetensors (index beside it).")
def verify_reference_cmd(checkpoint, golden):
    """Recompute golden outputs of the official implementation and compare."""
    from jfexport.reference.checkpoint import load_checkpoint
    from jfexport.reference.golden import GoldenFile, format_table, verify_golden

    golden_file = GoldenFile(golden)
    results = verify_golden(load_checkpoint(checkpoint), golden_file)
    say(format_table(results))
    failed = [r.name for r in results if not r.ok]
    if failed:
        raise click.ClickException(f"{len(failed)} tensor(s) outside tolerance: {', '.join(failed)}")
    say(f"all {len(results)} golden tensors within tolerance")
