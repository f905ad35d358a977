"""`jfexport bench-serve`: throughput and latency of concurrent clients, scheduler against one-at-a-time."""

from __future__ import annotations

import json
from pathlib import Path

import click

from jfexport import defaults
from jfexport.core.errors import InputError
from jfexport.core.processor.request_checks import MAX_PREVIEWS

from .options import DEFAULT_ENGINES, precision_option
from .output_files import check_json_target, say, write_json


@click.command("bench-serve")
@click.option("--engines", type=click.Path(path_type=Path), default=DEFAULT_ENGINES, show_default=True,
              help="Build folder to serve in process.")
@precision_option
@click.option("--clients", type=click.IntRange(min=1), default=8, show_default=True,
              help="Concurrent closed-loop clients.")
@click.option("--requests", "requests_", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests in each run (scheduler run and one-at-a-time run).")
@click.option("--mix", default="1:1", show_default=True, help="GEN:CHAT weights of the request kinds, e.g. 1:0, 0:1, 1:3.")
@click.option("--steps", type=click.IntRange(min=1), default=defaults.STEPS, show_default=True, help="Euler steps per image.")
@click.option("--cfg", default=defaults.CFG, show_default=True, help="Classifier-free guidance weight.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=defaults.MAX_NEW_TOKENS, show_default=True,
              help="Longest answer per question.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
@click.option("--url", default=None,
              help="Load a running server (`jfexport serve`, or the Ray Serve app) over HTTP instead of --engines.")
@click.option("--api-key", envvar="JFEXPORT_API_KEY", default=None, help="--url: the server's key (default: $JFEXPORT_API_KEY).")
@click.option("--decode", is_flag=True,
              help="Instead: decode tokens/s at 1, 4 and 8 rows at short and long context, time to first token of a "
                   "3-turn conversation with and without prefix reuse, K/V bytes per step against the floor.")
@click.option("--previews", type=click.IntRange(1, MAX_PREVIEWS), default=None,
              help="Instead: images only, every request without previews against the same requests with every "
                   "other one asking for this many previews (interleaved, rounds alternating): images/s of each, "
                   "and what the previews cost the requests without.")
def bench_serve_cmd(engines, precision, clients, requests_, mix, steps, cfg, max_new_tokens, json_path, url, api_key,
                    decode, previews):
    """Concurrent clients through the scheduler and through one request at a time, in one run.

    With --url, the same workload goes to a server over HTTP (chat streamed, for time to first token).
    """
    if decode:
        _bench_decode(engines, precision, max_new_tokens, json_path)
        return
    from jfexport.runtime.pipelines import JanusFlowRuntime
    from jfexport.tools.bench_serve import Workload, bench_serve

    check_json_target(json_path)
    try:
        gen, chat = Workload.parse_mix(mix)
    except ValueError as e:
        raise InputError(str(e)) from None
    workload = Workload(clients, requests_, gen, chat, steps, cfg, max_new_tokens)
    if url is not None:
        if previews is not None:
            raise InputError("--previews runs in process (--engines), not against --url")
        from jfexport.tools.http_load import bench_http

        results = bench_http(url, workload, api_key, progress=lambda m: click.echo(m, err=True))
    else:
        runtime = JanusFlowRuntime.from_engines(engines, precision=precision)
        try:
            if previews is not None:
                from jfexport.tools.bench_previews import bench_previews

                results = bench_previews(runtime, Workload(clients, requests_, 1, 0, steps, cfg), previews,
                                         progress=lambda m: click.echo(m, err=True))
            else:
                results = bench_serve(runtime, workload, progress=lambda m: click.echo(m, err=True))
        finally:
            runtime.close()
        results["engines"] = str(engines)
    text = json.dumps(results, indent=2)
    say(text)
    if json_path is not None:
        write_json(json_path, text)


def _bench_decode(engines: Path, precision: str | None, max_new_tokens: int, json_path: Path | None) -> None:
    from jfexport.core.manifest import Manifest
    from jfexport.runtime.engines_folder import pick_precision
    from jfexport.runtime.pipelines import JanusFlowRuntime
    from jfexport.tools.bench_decode import bench_decode

    check_json_target(json_path)
    manifest = Manifest.read(engines)
    decode = manifest.graphs["llm_decode"]
    files = decode.files[pick_precision(manifest, precision, "cpu")]
    weights = files.size + sum(e.size or 0 for e in files.external_data)
    results = bench_decode(lambda **kw: JanusFlowRuntime.from_engines(engines, precision=precision, tasks=("chat",), **kw),
                           decode.spec.extra["hidden"], weights, max_new_tokens,
                           progress=lambda m: click.echo(m, err=True))
    results["engines"] = str(engines)
    text = json.dumps(results, indent=2)
    say(text)
    if json_path is not None:
        write_json(json_path, text)
