"""`jfexport serve`: the OpenAI-compatible HTTP server (or its Ray Serve application)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import click

from jfexport import defaults

from .options import DEFAULT_ENGINES, precision_option


class _Number(click.ParamType):
    """A finite number > 0, or in [low, high] when given (click's FloatRange lets nan and inf through)."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if self.low is None or self.high is None:
            if not math.isfinite(number) or number <= 0:
                self.fail(f"must be a finite number > 0, got {value}", param, ctx)
        elif not self.low <= number <= self.high:  # false for nan
            self.fail(f"must be a number in {self.low:g} .. {self.high:g}, got {value}", param, ctx)
        return number


POSITIVE = _Number()
API_KEY_ENV = "JFEXPORT_API_KEY"


def _api_key(ctx, param, value):
    # An empty key would accept `Authorization: Bearer ` with an empty token: protected in name only.
    # (click reads an empty variable as unset: the server would be open while its operator meant it closed).
    if value is None and os.environ.get(API_KEY_ENV) is not None:
        value = os.environ[API_KEY_ENV]
        source = API_KEY_ENV
    else:
        from click.core import ParameterSource

        source = API_KEY_ENV if ctx.get_parameter_source(param.name) == ParameterSource.ENVIRONMENT else "--api-key"
    if value is not None:
        from jfexport.runtime.serving.settings import check_api_key

        try:
            check_api_key(value, source)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return value


@click.command("serve")
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help=f"Build folder of `jfexport build` (default: {DEFAULT_ENGINES}, built first if missing).")
@precision_option
@click.option("--host", default=defaults.HOST, show_default=True, help="Address to bind (0.0.0.0 to listen on all).")
@click.option("--port", type=click.IntRange(1, 65535), default=defaults.PORT, show_default=True,
              help="TCP port to listen on.")
@click.option("--api-key", envvar=API_KEY_ENV, default=None, callback=_api_key,
              help="Require `Authorization: Bearer KEY` on /v1 (default: $JFEXPORT_API_KEY; none = open).")
@click.option("--model-name", default=defaults.MODEL_NAME, show_default=True,
              help="The model id the API reports and accepts.")
@click.option("--max-queue", type=click.IntRange(min=1), default=defaults.MAX_QUEUE, show_default=True,
              help="Requests the scheduler admits; past it, 429.")
@click.option("--request-timeout", type=POSITIVE, default=defaults.REQUEST_TIMEOUT_S, show_default=True,
              help="Seconds per request, queueing included; 504 past it.")
@click.option("--grace", type=_Number(0, defaults.MAX_GRACE_S), default=defaults.GRACE_S, show_default=True,
              help="SIGTERM: seconds in-flight requests get to finish.")
@click.option("--max-body-mb", type=POSITIVE, default=defaults.MAX_BODY_MB, show_default=True,
              help="Largest request body; 413 past it.")
@click.option("--max-image-mb", type=POSITIVE, default=defaults.MAX_IMAGE_MB, show_default=True,
              help="Largest encoded image in a request; 413 past it.")
@click.option("--header-timeout", type=POSITIVE, default=defaults.HEADER_TIMEOUT_S, show_default=True,
              help="Seconds a request's headers may take to arrive; 408 and the connection closed past it.")
@click.option("--body-timeout", type=POSITIVE, default=defaults.BODY_TIMEOUT_S, show_default=True,
              help="Seconds a request's body may take to arrive; 408 past it.")
@click.option("--send-timeout", type=POSITIVE, default=defaults.SEND_TIMEOUT_S, show_default=True,
              help="Seconds an answer may wait on a client that reads none of it; the connection is closed past it.")
@click.option("--max-connections", type=click.IntRange(min=1), default=defaults.MAX_CONNECTIONS, show_default=True,
              help="Open connections; past it a new one gets 503 and is closed (logged).")
@click.option("--ray", "use_ray", is_flag=True, help="Run the Ray Serve application on a local Ray instance instead.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="--ray: replicas, each holding one runtime.")
def serve_cmd(engines, precision, host, port, api_key, model_name, max_queue, request_timeout, grace,
              max_body_mb, max_image_mb, header_timeout, body_timeout, send_timeout, max_connections, use_ray,
              replicas):
    """Serve the engines over the OpenAI API: chat completions with an image, image generations.

    The engines run on the backend the build was made for (TensorRT or ONNX Runtime).
    """
    if not model_name.strip():
        raise click.BadParameter("must not be empty", param_hint="--model-name")
    if not host.strip():
        # An unset variable in `--host "$HOST"` would otherwise bind every interface.
        raise click.BadParameter("must not be empty (0.0.0.0 listens on all interfaces)", param_hint="--host")
    from jfexport.runtime.serving.server import listen

    try:  # before building or loading anything: a port in use is said at once
        listen(host, port).close()
    except OSError as e:
        raise click.ClickException(str(e.strerror)) from None
    if engines is None:
        engines = DEFAULT_ENGINES
        if not (engines / "manifest.json").is_file():
            click.echo(f"no build in {engines}: building the bundled default model first", err=True)
            # In a child process: the server process imports no model code.
            if _build_default(engines):
                raise click.ClickException(f"building {engines} failed (see above)")
    options = {"precision": precision, "max_queue": max_queue, "api_key": api_key, "model": model_name,
               "request_timeout": request_timeout, "max_body_mb": max_body_mb, "max_image_mb": max_image_mb,
               "grace": grace, "header_timeout": header_timeout, "body_timeout": body_timeout,
               "send_timeout": send_timeout, "max_connections": max_connections}
    from jfexport.runtime.serving.settings import ServeSettings

    try:  # named as a usage error before anything starts (the Ray app checks them again, for `serve run`)
        settings = ServeSettings.from_options(options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if use_ray:
        from jfexport.core.manifest import Manifest
        from jfexport.runtime.serving.ray_local import serve_on_ray

        Manifest.read(engines)  # a folder that is no build is named here, not by Ray's failed deployment

        sys.exit(serve_on_ray({**options, "engines": str(engines.resolve()), "replicas": replicas}, host, port))
    from jfexport.runtime.serving.server import exit_now, serve

    try:
        code = serve(engines, host, port, settings)
    except OSError as e:  # taken since the check above; still before anything loaded
        raise click.ClickException(str(e.strerror)) from None
    exit_now(code)


def _build_default(engines: Path) -> int:
    """`jfexport build --out engines` in a child process; its exit code. Interrupted here (a SIGTERM sent to
    this process alone), the child is asked to stop as well and waited for, so that it removes its staging
    folder: subprocess.run would kill it outright."""
    child = subprocess.Popen([sys.executable, "-m", "jfexport.cli", "build", "--out", str(engines)])
    try:
        return child.wait()
    except BaseException:
        try:
            child.wait(1)  # a Ctrl-C at a terminal reached it too
        except subprocess.TimeoutExpired:
            child.terminate()
            child.wait()
        raise
