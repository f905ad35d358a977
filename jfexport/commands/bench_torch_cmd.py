"""`jfexport bench-torch`: the PyTorch paths (official eager, prompt K/V, CUDA graphs) and the serving
variants through the scheduler, each change on and off (fast executors, CUDA graphs, k tokens per
host round trip, FP8 with its quality cost, the Euler step compiled)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from jfexport import defaults

from .options import load_model, model_options
from .output_files import check_json_target, say, write_json


@click.command("bench-torch")
@model_options
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default=None, help="Default: bf16 on GPU, fp32 on CPU.")
@click.option("--batches", default="1,4", show_default=True, help="Comma-separated images per call.")
@click.option("--steps", type=click.IntRange(min=1), default=defaults.STEPS, show_default=True, help="Euler steps per image.")
@click.option("--cfg", default=defaults.CFG, show_default=True, help="Classifier-free guidance weight.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed calls before the runs.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Timed calls per measurement.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens decoded by the understanding benchmark.")
@click.option("--chunk", type=click.IntRange(min=1), default=8, show_default=True,
              help="Tokens per host round trip of the fast chat executor (compared with 1).")
@click.option("--fp8/--no-fp8", default=True, show_default=True,
              help="Also time FP8 LLM matrix products and report their quality cost.")
@click.option("--compile/--no-compile", "compile_step", default=True, show_default=True,
              help="Also time the scheduler's Euler step compiled by torch.compile (each new shape compiles once).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
def bench_torch_cmd(checkpoint, vae, preset, device, dtype, batches, steps, cfg, warmup, runs, max_new_tokens, chunk, fp8,
                    compile_step, json_path):
    """Time the torch paths and the scheduler's serving variants, each change on and off, with physical floors."""
    import torch

    from jfexport.tools.bench_paths import bench_torch_paths

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is visible", param_hint="--device")
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    try:
        batch_list = [int(b) for b in batches.split(",")]
    except ValueError:
        raise click.BadParameter(f"not a list of integers: {batches!r}", param_hint="--batches") from None
    if min(batch_list) < 1:
        raise click.BadParameter(f"batch sizes must be >= 1: {batches!r}", param_hint="--batches")
    check_json_target(json_path)
    bundle = load_model(checkpoint, vae, preset)
    click.echo(f"bench-torch: {bundle.source} on {device} ({torch_dtype})", err=True)
    result = bench_torch_paths(bundle, device, torch_dtype, batch_list, steps, cfg, warmup, runs, max_new_tokens,
                               "a red circle at the top left", chunk, fp8, compile_step)
    result = {"model": bundle.source, "command": " ".join(["jfexport", *sys.argv[1:]]), **result}
    text = json.dumps(result, indent=2)
    say(text)
    if json_path is not None:
        write_json(json_path, text)
