"""`jfexport serve`: the OpenAI-compatible HTTP server (or its Ray Serve application)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from jfexport import defaults

from .options import DEFAULT_ENGINES, precision_option


@click.command("serve")
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help=f"Build folder of `jfexport build` (default: {DEFAULT_ENGINES}, built first if missing).")
@precision_option
@click.option("--host", default=defaults.HOST, show_default=True, help="Address to bind (0.0.0.0 to listen on all).")
@click.option("--port", type=click.IntRange(0, 65535), default=defaults.PORT, show_default=True, help="TCP port to listen on.")
@click.option("--api-key", envvar="JFEXPORT_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on /v1 (default: $JFEXPORT_API_KEY; none = open).")
@click.option("--model-name", default=defaults.MODEL_NAME, show_default=True, help="The model id the API reports and accepts.")
@click.option("--max-queue", type=click.IntRange(min=1), default=defaults.MAX_QUEUE, show_default=True, help="Requests the scheduler admits; past it, 429.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=defaults.REQUEST_TIMEOUT_S, show_default=True, help="Seconds per request, queueing included; 504 past it.")
@click.option("--grace", type=click.FloatRange(min=0), default=defaults.GRACE_S, show_default=True, help="SIGTERM: seconds in-flight requests get to finish.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=defaults.MAX_BODY_MB, show_default=True, help="Largest request body; 413 past it.")
@click.option("--max-image-mb", type=click.FloatRange(min=0, min_open=True), default=defaults.MAX_IMAGE_MB, show_default=True, help="Largest encoded image in a request; 413 past it.")
@click.option("--ray", "use_ray", is_flag=True, help="Run the Ray Serve application on a local Ray instance instead.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="--ray: replicas, each holding one runtime.")
def serve_cmd(engines, precision, host, port, api_key, model_name, max_queue, request_timeout, grace,
              max_body_mb, max_image_mb, use_ray, replicas):
    """Serve the engines over the OpenAI API: chat completions with an image, image generations.

    The engines run on the backend the build was made for (TensorRT or ONNX Runtime).
    """
    if engines is None:
        engines = DEFAULT_ENGINES
        if not (engines / "manifest.json").is_file():
            click.echo(f"no build in {engines}: building the bundled default model first", err=True)
            # In a child process: the server process imports no model code.
            if subprocess.run([sys.executable, "-m", "jfexport.cli", "build", "--out", str(engines)]).returncode:
                raise click.ClickException(f"building {engines} failed (see above)")
    if use_ray:
        from jfexport.runtime.serving.ray_local import serve_on_ray

        args = {"engines": str(engines.resolve()), "precision": precision, "replicas": replicas,
                "max_queue": max_queue, "api_key": api_key, "model": model_name, "request_timeout": request_timeout,
                "max_body_mb": max_body_mb, "max_image_mb": max_image_mb, "grace": grace}
        sys.exit(serve_on_ray(args, host, port))
    from jfexport.runtime.serving.server import serve
    from jfexport.runtime.serving.service import Limits

    limits = Limits(max_body_bytes=int(max_body_mb * 2**20), max_image_bytes=int(max_image_mb * 2**20),
                    request_timeout=request_timeout)
    sys.exit(serve(engines, host, port, precision=precision, api_key=api_key, model_id=model_name,
                   limits=limits, max_queue=max_queue, grace=grace))
