"""What the server tests share: a server process on a free port (over conftest's `default_build`),
images as data: URLs and Prometheus samples."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from .conftest import REPO

QUESTION = "What colour is the shape?"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(interval)
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shape_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((6, 6, 30, 30), fill=(220, 30, 30))
    return image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent, as for a counter never incremented)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class ServerProcess:
    """`jfexport serve` (or any command) in a child process, stopped for sure at the end."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: Path = REPO):
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "jfexport.cli", *args], cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)

    def wait_ready(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}:\n{self.log()}"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"the server at {url} was not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL of its whole process group if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def running_server(args: list[str], log: Path, env: dict | None = None) -> Iterator[tuple[str, ServerProcess]]:
    """`jfexport serve ARGS --port P` on a free port: (its URL, the process) once it is ready; stopped after."""
    port = free_port()
    proc = ServerProcess(["serve", *args, "--port", str(port)], log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url)
        yield url, proc
    finally:
        proc.stop()
