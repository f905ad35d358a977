"""What the CLI imports before it does anything: `--help` no ML library, `chat` and `serve` on an
engines folder no model code. Each check runs a fresh interpreter: an import made by an earlier
test in this process would hide one made by the command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO
from .serve_helpers import running_server, shape_image

HEAVY = ("torch", "transformers", "diffusers", "onnx", "onnxruntime")
MODEL_CODE = ("transformers", "diffusers", "jfexport.reference.modules")


@pytest.fixture(scope="module")
def engines(default_build) -> Path:
    return default_build


def _imported(stderr: str) -> set[str]:
    """Modules a `python -X importtime` run imported (one line per import on stderr)."""
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", stderr, re.M)}


def _matching(modules: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in roots))


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "jfexport.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_help_of_the_cli_and_of_every_command_imports_no_ml_library():
    from jfexport.cli import cli

    for args in ([], *([name] for name in cli.commands)):
        res = _cli(*args, "--help")
        assert res.returncode == 0, (args, res.stderr[-2000:])
        assert "Usage:" in res.stdout
        assert _matching(_imported(res.stderr), HEAVY) == [], args


def test_chat_on_an_engines_folder_imports_no_model_code(engines, tmp_path):
    image = tmp_path / "shape.png"
    shape_image().save(image)
    res = _cli("chat", "--engines", str(engines), "--image", str(image), "What colour is the shape?",
               "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    imported = _imported(res.stderr)
    assert "jfexport.runtime.pipelines" in imported  # the check saw the command's imports
    assert _matching(imported, MODEL_CODE) == []


def test_serve_on_an_engines_folder_imports_no_model_code(engines, tmp_path):
    log = tmp_path / "serve.log"
    # PYTHONPROFILEIMPORTTIME=1 is -X importtime: every import on stderr, which the log holds.
    with running_server(["--engines", str(engines), "--grace", "1"], log, env={"PYTHONPROFILEIMPORTTIME": "1"}):
        pass
    text = log.read_text(errors="replace")
    imported = _imported(text)
    assert "jfexport.runtime.serving.server" in imported
    assert _matching(imported, MODEL_CODE) == []
    # Routine lines are INFO: a WARNING from the server is worth a look.
    assert "INFO jfexport.serve: listening on" in text and "INFO jfexport.serve: ready:" in text
    assert "WARNING jfexport.serve" not in text


def test_bench_startup_writes_the_spread_of_each_measurement(engines, tmp_path):
    import json

    out = tmp_path / "startup.json"
    res = subprocess.run([sys.executable, "-m", "jfexport.cli", "bench-startup", "--engines", str(engines), "--runs", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    for name in ("import_jfexport_cli", "help", "chat_one_token", "serve_to_ready"):
        m = data[name]
        assert m["runs"] == 1 and 0 < m["min_ms"] <= m["median_ms"] <= m["max_ms"], name
    # Serving starts by loading the engines: far longer than an import or `--help`, which differ by the
    # help text alone (one run of each: their order is the machine's noise, not a property to assert).
    quick = max(data["import_jfexport_cli"]["median_ms"], data["help"]["median_ms"])
    assert quick < data["serve_to_ready"]["median_ms"]
