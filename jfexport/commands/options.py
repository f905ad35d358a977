"""Options shared by several commands, and how they resolve to a model or a runtime."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from jfexport.core.presets import PRESETS
from jfexport.defaults import BACKENDS, ENGINE_PRECISIONS
from jfexport.defaults import ENGINES as DEFAULT_ENGINES

if TYPE_CHECKING:  # the torch side is imported only when a command runs it
    from jfexport.reference.pipelines.reference_pipeline import Numerics


def backend_option(choices: tuple[str, ...], help: str) -> Callable:
    return click.option("--backend", type=click.Choice(choices), default="auto", show_default=True, help=help)


def precision_option(f):
    return click.option("--precision", type=click.Choice(ENGINE_PRECISIONS), default=None,
                        help="Engine precision to load from the build (default: fp16 on a GPU when built, else fp32; int8 only "
                             "when asked for).")(f)


def model_options(f):
    f = click.option("--preset", type=click.Choice(PRESETS), default=None, help="Named model with random weights.")(f)
    f = click.option("--vae", type=click.Path(path_type=Path), default=None, help="diffusers AutoencoderKL folder.")(f)
    f = click.option(
        "--checkpoint", type=click.Path(path_type=Path), default=None,
        help="Checkpoint folder in the official layout (default: the bundled default model).",
    )(f)
    return f


def runtime_options(f):
    f = backend_option(BACKENDS, "auto: the engines folder if it holds a build, else the torch reference.")(f)
    f = click.option("--engines", type=click.Path(path_type=Path), default=None,
                     help=f"Build folder of `jfexport build` (default: {DEFAULT_ENGINES}).")(f)
    f = precision_option(f)
    f = click.option("--verify-files", is_flag=True,
                     help="Hash every graph file in full before serving (default: full hash on first use, then "
                          "size/mtime/inode stamps).")(f)
    return model_options(f)


def load_model(checkpoint, vae, preset):
    from jfexport.reference.bundle import load_bundle

    return load_bundle(checkpoint=checkpoint, vae=vae, preset=preset)


def open_pipeline(engines, backend, precision, checkpoint, vae, preset, numerics: Numerics = "fp32", task: str | None = None,
                  verify_files: bool = False):
    """The PyTorch reference (torch backend, or a model given directly) or a runtime over a build;
    `task` ("generate" or "chat") opens only the graphs that task runs."""
    from jfexport.core.errors import InputError

    direct_model = checkpoint is not None or preset is not None
    folder = engines or DEFAULT_ENGINES
    has_build = (folder / "manifest.json").is_file()
    if backend == "torch" or (backend == "auto" and (direct_model or (engines is None and not has_build))):
        from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline

        if backend == "auto" and not direct_model:
            click.echo(f"no build in {folder} (run `jfexport build`): using the torch backend", err=True)
        bundle = load_model(checkpoint, vae, preset)
        if task in ("generate", None):  # named now, not after sampling has run
            bundle.require_vae()
        return ReferencePipeline(bundle, numerics)
    if direct_model:
        raise InputError(f"--backend {backend} runs built engines: build them with `jfexport build`, then pass --engines")
    if numerics != "fp32":
        raise InputError("--numerics bf16 applies to the torch backend only")
    from jfexport.runtime.pipelines import JanusFlowRuntime

    tasks = (task,) if task else ("generate", "chat")
    return JanusFlowRuntime.from_engines(folder, backend, precision, tasks=tasks, verify_files=verify_files)


def reference_bundle_for_build(engines: Path, checkpoint=None, vae=None):
    """The model a build was made from (as its manifest records), checked by weights fingerprint."""
    from jfexport.core.manifest import EnginesError, Manifest
    from jfexport.reference.bundle import load_bundle

    manifest = Manifest.read(engines)
    source = manifest.model.source
    if checkpoint is not None:
        bundle = load_bundle(checkpoint=checkpoint, vae=vae)
    elif source.startswith("preset:"):
        bundle = load_bundle(preset=source.split(":", 1)[1])
    elif Path(source).is_dir():
        bundle = load_bundle(checkpoint=source, vae=vae)
    else:
        raise EnginesError(f"the reference model {source} recorded in the manifest is gone; pass --checkpoint")
    if bundle.fingerprint != manifest.model.fingerprint:
        raise EnginesError(f"{engines} was built from other weights than {bundle.source}: "
                           "rebuild, or pass the right --checkpoint")
    return bundle
