"""Commands that run the PyTorch reference: generate, chat, verify-reference."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .options import load_model, model_options


@click.command("generate")
@click.argument("prompts", nargs=-1, required=True)
@model_options
@click.option("--backend", type=click.Choice(["torch"]), default="torch", show_default=True)
@click.option("-n", "--num-images", default=1, show_default=True, help="Images per prompt.")
@click.option("--steps", default=30, show_default=True)
@click.option("--cfg", default=2.0, show_default=True, help="Classifier-free guidance weight.")
@click.option("--seed", default=0, show_default=True)
@click.option("--numerics", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16 reproduces the official demo's rounding (bf16 model, t and dt).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("out"), show_default=True)
def generate_cmd(prompts, checkpoint, vae, preset, backend, num_images, steps, cfg, seed, numerics, out):
    """Text-to-image: write PNG files for PROMPTS."""
    from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline

    bundle = load_model(checkpoint, vae, preset)
    pipe = ReferencePipeline(bundle, numerics)
    with click.progressbar(length=steps, label=f"sampling ({bundle.source})", file=sys.stderr) as bar:
        images = pipe.generate(list(prompts), n=num_images, steps=steps, cfg=cfg, seed=seed,
                               on_step=lambda done, total: bar.update(1))
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out / f"image_{i}.png"
        tmp = path.with_suffix(".png.tmp")
        image.save(tmp, format="PNG")
        tmp.replace(path)
        click.echo(str(path))


@click.command("chat")
@click.argument("question")
@model_options
@click.option("--image", "image_path", type=click.Path(path_type=Path), required=True)
@click.option("--backend", type=click.Choice(["torch"]), default="torch", show_default=True)
@click.option("--max-new-tokens", default=512, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--seed", default=0, show_default=True)
def chat_cmd(question, checkpoint, vae, preset, image_path, backend, max_new_tokens, temperature, top_p, seed):
    """Answer QUESTION about an image, streaming the answer."""
    from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
    from jfexport.reference.processor import load_image

    image = load_image(image_path)
    pipe = ReferencePipeline(load_model(checkpoint, vae, preset))
    tokenizer = pipe.processor.tokenizer
    ids: list[int] = []
    printed = ""
    for token in pipe.chat_stream([image], [question], max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed):
        t = int(token[0])
        if t == tokenizer.eos_id:
            break
        ids.append(t)
        # Decode the whole answer each time: a byte-level token may be half a character, so hold
        # back a trailing replacement character until the next token completes it.
        text = tokenizer.decode(ids).rstrip("\ufffd")
        click.echo(text[len(printed):], nl=False)
        printed = text
    click.echo()


@click.command("verify-reference")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="config.json + weights.")
@click.option("--golden", type=click.Path(path_type=Path), required=True, help="golden.safetensors (index beside it).")
def verify_reference_cmd(checkpoint, golden):
    """Recompute golden outputs of the official implementation and compare."""
    from jfexport.reference.checkpoint import load_checkpoint
    from jfexport.reference.golden import GoldenFile, format_table, verify_golden

    golden_file = GoldenFile(golden)
    results = verify_golden(load_checkpoint(checkpoint), golden_file)
    click.echo(format_table(results))
    failed = [r.name for r in results if not r.ok]
    if failed:
        raise click.ClickException(f"{len(failed)} tensor(s) outside tolerance: {', '.join(failed)}")
    click.echo(f"all {len(results)} golden tensors within tolerance")
