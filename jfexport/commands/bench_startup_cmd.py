"""`jfexport bench-startup`: how long the CLI takes before it does anything, and `serve` until it is ready."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from .options import DEFAULT_ENGINES
from .output_files import check_json_target, say, write_json

# How often the server's /ready is polled: the resolution of the time-to-ready figure.
POLL_S = 0.02


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if res.returncode:
        raise click.ClickException(f"{' '.join(cmd[1:])} failed ({res.returncode}): {res.stderr[-2000:]}")
    return elapsed


def _import_cli() -> float:
    """Seconds to import jfexport.cli in a fresh interpreter (the interpreter's own start excluded)."""
    code = "import time; t = time.perf_counter(); import jfexport.cli; print(time.perf_counter() - t)"
    res = subprocess.run(_python("-c", code), capture_output=True, text=True, check=True)
    return float(res.stdout)


def _serve_until_ready(engines: Path, port: int) -> float:
    """Seconds from starting `jfexport serve` to its first 200 on /ready (it is stopped after)."""
    import httpx

    start = time.perf_counter()
    proc = subprocess.Popen(_python("-m", "jfexport.cli", "serve", "--engines", str(engines), "--port", str(port),
                                    "--grace", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
        stderr = proc.stderr.read().decode() if proc.stderr is not None else ""  # a pipe: never None
        raise click.ClickException(f"serve exited with {proc.returncode}: {stderr[-2000:]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@click.command("bench-startup")
@click.option("--engines", type=click.Path(path_type=Path), default=DEFAULT_ENGINES, show_default=True,
              help="Build folder that `chat` and `serve` open.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Runs of each measurement, interleaved.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
def bench_startup_cmd(engines, runs, json_path):
    """Startup: import of jfexport.cli, `jfexport --help`, a 1-token `chat`, and `serve` until /ready."""
    from PIL import Image

    from jfexport.core.manifest import Manifest
    from jfexport.tools.bench import machine_info, summarize

    check_json_target(json_path)
    Manifest.read(engines)  # a missing build is named now, not as a failed child process
    click.echo(f"startup of fresh `jfexport` processes on {engines}: {runs} interleaved runs of each", err=True)
    samples: dict[str, list[float]] = {"import_jfexport_cli": [], "help": [], "chat_one_token": [], "serve_to_ready": []}
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "shape.png"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
        chat = _python("-m", "jfexport.cli", "chat", "--engines", str(engines), "--image", str(image),
                       "What colour is the shape?", "--max-new-tokens", "1")
        for i in range(runs):
            samples["import_jfexport_cli"].append(_import_cli())
            samples["help"].append(_wall(_python("-m", "jfexport.cli", "--help")))
            samples["chat_one_token"].append(_wall(chat))
            samples["serve_to_ready"].append(_serve_until_ready(engines, _free_port()))
            click.echo(f"run {i + 1}/{runs}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in samples.items()), err=True)
    result = {"engines": str(engines), "command": " ".join(["jfexport", *sys.argv[1:]]),
              "what": "wall time of fresh processes: `import jfexport.cli` (interpreter start excluded), "
                      "`jfexport --help`, `jfexport chat` answering 1 token, `jfexport serve` from start to its "
                      f"first 200 on /ready (polled every {POLL_S * 1e3:.0f} ms)",
              **{k: summarize(v) for k, v in samples.items()}, "machine": machine_info()}
    text = json.dumps(result, indent=2)
    say(text)
    if json_path is not None:
        write_json(json_path, text)
