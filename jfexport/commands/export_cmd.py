"""`jfexport export`: ONNX graphs + the export part of manifest.json."""

from __future__ import annotations

from pathlib import Path

import click

from .options import load_model, model_options
from .output_files import say


def parse_graphs(value: str | None) -> list[str] | None:
    return [g.strip() for g in value.split(",") if g.strip()] if value else None


@click.command("export")
@model_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--graphs", default=None, help="Comma-separated subset (default: all seven).")
@click.option("--fp16", is_flag=True, help="Also export typed fp16 graphs (fp32 graphs are always exported; the VAE stays fp32).")
def export_cmd(checkpoint, vae, preset, out, graphs, fp16):
    """Export the JanusFlow graphs to ONNX, validated against PyTorch in ONNX Runtime."""
    from jfexport.export.exporter import ExportError, export_all

    names = parse_graphs(graphs)
    if fp16 and names == ["vae_decoder"]:
        raise ExportError("vae_decoder has no fp16 graph: the SDXL VAE overflows in fp16 (drop --fp16)")
    bundle = load_model(checkpoint, vae, preset)
    manifest = export_all(bundle, out, names, ("fp32", "fp16") if fp16 else ("fp32",),
                          progress=lambda msg: click.echo(msg, err=True))
    say(f"{len(manifest.graphs)} graphs written to {out}")
