"""Commands that run a model: build, generate, chat, verify."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from jfexport import defaults
from jfexport.core.processor.request_checks import (
    MAX_NEW_TOKENS,
    MAX_PREVIEWS,
    MAX_TEMPERATURE,
    check_previews,
    check_prompt,
)
from jfexport.defaults import ENGINE_BACKENDS

from .image_output import plan_image_paths, png_bound, provenance, write_png
from .options import (
    DEFAULT_ENGINES,
    backend_option,
    load_model,
    model_options,
    open_pipeline,
    precision_option,
    reference_bundle_for_build,
    runtime_options,
)
from .output_files import OutputError, check_room, ensure_writable_folder, removed_if_left_empty, say


@click.command("build")
@model_options
@click.option("--fp16", is_flag=True, help="Also build typed fp16 graphs (the VAE stays fp32).")
@click.option("--int8", is_flag=True, help="Also build calibrated INT8 Q/DQ graphs of the LLM and generation encoder/decoder "
                                          "(ranges cached in calibration.json).")
@backend_option(ENGINE_BACKENDS, "Engines to compile for (auto: TensorRT when it and a GPU are present, else ONNX Runtime).")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_ENGINES, show_default=True, help="Build folder.")
@click.option("--max-batch", default=defaults.MAX_BATCH, show_default=True, help="Largest batch (rows; CFG doubles images).")
@click.option("--max-seq", type=int, default=None,
              help="Longest sequence (prompt + generated tokens)  [default: the model's max_position_embeddings, at most "
                   "4096].")
def build_cmd(checkpoint, vae, preset, fp16, int8, backend, out, max_batch, max_seq):
    """Export, check and compile the engines; reuses what is up to date."""
    from jfexport.export.build import build, build_limits

    bundle = load_model(checkpoint, vae, preset)
    manifest = build(bundle, out, fp16=fp16, int8=int8, backend=backend, limits=build_limits(bundle, max_batch, max_seq),
                     progress=lambda msg: click.echo(msg, err=True))
    done = ([f"rebuilt {', '.join(manifest.rebuilt)}"] if manifest.rebuilt else []) + [
        f"added {', '.join(precisions)} to {name}" for name, precisions in (manifest.added or {}).items()]
    backend = manifest.backend.name if manifest.backend is not None else "onnxruntime"
    say(f"built {out} ({backend}): " + ("; ".join(done) or "everything up to date"))


@click.command("generate")
@click.argument("prompts", nargs=-1, required=True)
@runtime_options
@click.option("-n", "--num-images", type=click.IntRange(min=1), default=defaults.IMAGES_PER_PROMPT, show_default=True,
              help="Images per prompt.")
@click.option("--steps", type=click.IntRange(min=1), default=defaults.STEPS, show_default=True, help="Euler steps of the flow.")
@click.option("--cfg", default=defaults.CFG, show_default=True, help="Classifier-free guidance weight.")
@click.option("--seed", type=click.IntRange(min=0), default=defaults.SEED, show_default=True, help="Seed of the initial noise.")
@click.option("--numerics", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="torch backend: bf16 reproduces the official demo's rounding (bf16 model, t and dt).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("out"), show_default=True,
              help="Folder for image_<i>.png; new images are numbered after those already there.")
@click.option("--overwrite", is_flag=True, help="Number from image_0.png, replacing existing images.")
@click.option("--previews", "previews_dir", type=click.Path(path_type=Path), default=None,
              help="Also write previews of each image as it forms (the VAE decode of the clean latent the sampler "
                   "heads for) to this folder, as <image name>_preview_<j>.png; needs built engines.")
@click.option("--num-previews", type=click.IntRange(1, MAX_PREVIEWS), default=MAX_PREVIEWS, show_default=True,
              help="Previews per image with --previews, at steps spread before the last.")
def generate_cmd(prompts, engines, backend, precision, verify_files, checkpoint, vae, preset, num_images, steps, cfg, seed,
                 numerics, out, overwrite, previews_dir, num_previews):
    """Text-to-image: write PNG files for PROMPTS."""
    with removed_if_left_empty(out, *([previews_dir] if previews_dir is not None else [])):
        _generate(prompts, engines, backend, precision, verify_files, checkpoint, vae, preset, num_images, steps, cfg,
                  seed, numerics, out, overwrite, previews_dir, num_previews)


def _generate(prompts, engines, backend, precision, verify_files, checkpoint, vae, preset, num_images, steps, cfg, seed,
              numerics, out, overwrite, previews_dir, num_previews) -> None:
    for i, prompt in enumerate(prompts):  # before any model is loaded or folder made
        check_prompt(prompt, "PROMPT" if len(prompts) == 1 else f"PROMPTS[{i}]")
    paths = plan_image_paths(out, len(prompts) * num_images, overwrite)
    if previews_dir is not None:
        check_previews(num_previews, steps, "--num-previews")
        ensure_writable_folder(previews_dir, "--previews")
        taken = [p.name for path in paths for j in range(num_previews)
                 if (p := _preview_path(previews_dir, path, j)).exists()]
        if taken and not overwrite:
            raise OutputError(f"--previews {previews_dir}: {', '.join(taken)} exist(s); pass --overwrite to replace")
    pipe = open_pipeline(engines, backend, precision, checkpoint, vae, preset, numerics, "generate", verify_files)
    model = _model_record(pipe, engines or DEFAULT_ENGINES, numerics)
    per_image = png_bound(pipe.image_size, provenance(list(prompts), num_images, 0, seed, steps, cfg, model))
    images_need = len(paths) * per_image
    if previews_dir is None:
        check_room(out, images_need, "-o")
    else:
        previews_need = len(paths) * num_previews * per_image
        if os.stat(out).st_dev == os.stat(previews_dir).st_dev:
            check_room(out, images_need + previews_need, "-o and --previews")
        else:
            check_room(out, images_need, "-o")
            check_room(previews_dir, previews_need, "--previews")
    if previews_dir is None:
        with click.progressbar(length=steps, label="sampling", file=sys.stderr) as bar:
            images = pipe.generate(list(prompts), n=num_images, steps=steps, cfg=cfg, seed=seed,
                                   on_step=lambda done, total: bar.update(1))
    else:
        images = _generate_with_previews(pipe, list(prompts), num_images, steps, cfg, seed, num_previews, previews_dir,
                                         paths, overwrite)
    for index, (image, path) in enumerate(zip(images, paths, strict=True)):
        write_png(image, path, overwrite, provenance(list(prompts), num_images, index, seed, steps, cfg, model))
    # Named once every image is written: a standard output that fails (closed, full) loses none of them.
    for path in paths:
        say(str(path))


def _generate_with_previews(pipe, prompts: list[str], n: int, steps: int, cfg: float, seed: int, previews: int,
                            folder: Path, paths: list[Path], overwrite: bool) -> list:
    """The images of `prompts` (one request, so the same images as `generate`), writing each preview as
    it comes, named after the image it shows (image_3.png -> image_3_preview_0.png, ...)."""
    from jfexport.core.errors import InputError

    if not hasattr(pipe, "submit_generate"):
        raise InputError("--previews runs on built engines (the torch reference loop makes no previews): build them "
                         "with `jfexport build`, then pass --engines")
    handle = pipe.submit_generate(prompts, n=n, steps=steps, cfg=cfg, seed=seed, previews=previews)
    for preview in handle.previews():
        target = _preview_path(folder, paths[preview.image], preview.index)
        write_png(preview.picture, target, overwrite)
        click.echo(str(target), err=True)
    return handle.result()


def _preview_path(folder: Path, image: Path, index: int) -> Path:
    return folder / f"{image.stem}_preview_{index}.png"


def _model_record(pipe, engines: Path, numerics: str) -> dict:
    """What made the images: the weights' fingerprint, and for engines the build (its manifest's sha256)."""
    bundle = getattr(pipe, "bundle", None)
    if bundle is not None:  # the PyTorch reference
        return {"model": bundle.source, "model_fingerprint": bundle.fingerprint, "backend": "torch",
                "numerics": numerics}
    import hashlib
    import json

    from jfexport.core.manifest import MANIFEST, Manifest

    raw = (engines / MANIFEST).read_bytes()
    model = Manifest.from_json(json.loads(raw), engines / MANIFEST).model
    return {"model": model.source, "model_fingerprint": model.fingerprint, "engines": str(engines),
            "manifest_sha256": hashlib.sha256(raw).hexdigest(), "backend": pipe.backend,
            "precision": pipe.engines.precision}


@click.command("chat")
@click.argument("question")
@runtime_options
@click.option("--image", "image_path", type=click.Path(path_type=Path), required=True, help="The image to ask about.")
@click.option("--max-new-tokens", type=click.IntRange(1, MAX_NEW_TOKENS), default=defaults.MAX_NEW_TOKENS, show_default=True,
              help="Longest answer, in tokens.")
@click.option("--temperature", type=click.FloatRange(0, MAX_TEMPERATURE), default=defaults.TEMPERATURE, show_default=True,
              help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=defaults.TOP_P, show_default=True,
              help="Nucleus sampling mass (with --temperature > 0).")
@click.option("--seed", type=click.IntRange(min=0), default=defaults.SEED, show_default=True,
              help="Sampling seed (with --temperature > 0).")
def chat_cmd(question, engines, backend, precision, verify_files, checkpoint, vae, preset, image_path, max_new_tokens,
             temperature, top_p, seed):
    """Answer QUESTION about an image, streaming the answer."""
    from jfexport.core.processor import load_image

    image = load_image(image_path)
    pipe = open_pipeline(engines, backend, precision, checkpoint, vae, preset, task="chat", verify_files=verify_files)
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
        say(text[len(printed):], nl=False)
        printed = text
    say()


@click.command("verify")
@click.option("--engines", type=click.Path(path_type=Path), default=DEFAULT_ENGINES, show_default=True,
              help="Build folder to verify.")
@backend_option(ENGINE_BACKENDS, "Backend to run the build with (auto: the one it was built for).")
@precision_option
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Reference model (default: the one the manifest records).")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="diffusers AutoencoderKL folder of the reference.")
@click.option("--steps", type=click.IntRange(min=1), default=defaults.STEPS, show_default=True,
              help="Euler steps of the end-to-end check.")
def verify_cmd(engines, backend, precision, checkpoint, vae, steps):
    """End-to-end parity of built engines with the PyTorch reference."""
    from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
    from jfexport.runtime.engines_folder import check_build
    from jfexport.runtime.pipelines import JanusFlowRuntime
    from jfexport.tools.verify import format_checks, verify

    def progress(msg: str) -> None:
        click.echo(msg, err=True)

    # verify is the command that re-establishes trust: every file is hashed, whatever the stamps say.
    progress(f"{engines}: hashing every file")
    checked = check_build(engines, backend, precision, verify_files=True)
    runtime = JanusFlowRuntime.from_engines(engines, backend, checked.precision, checked.device)
    progress("loading the reference model")
    bundle = reference_bundle_for_build(engines, checkpoint, vae)
    checks = verify(runtime, ReferencePipeline(bundle), steps=steps, progress=progress)
    say(format_checks(checks))
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise click.ClickException(f"verification failed: {', '.join(failed)}")
    say(f"{engines}: engines match the reference")
