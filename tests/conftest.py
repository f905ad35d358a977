"""Shared fixtures: the official-A golden checkpoint (regenerated, never stored) and the tiny preset."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OFFICIAL_A = SHARED / "fixtures" / "official-A"


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `jfexport` in a fresh process, as a user would (exit codes, stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "jfexport.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="session")
def official_a_dir(tmp_path_factory) -> Path:
    """config.json + model.safetensors of official-A, regenerated bit-exactly from its manifest."""
    if not (OFFICIAL_A / "manifest.json").is_file():
        pytest.skip(f"golden fixtures not found at {OFFICIAL_A}")
    folder = tmp_path_factory.mktemp("official-A")
    subprocess.run(
        [sys.executable, str(SHARED / "fixtures" / "make_weights.py"), str(OFFICIAL_A / "manifest.json"),
         "--out", str(folder / "model.safetensors")],
        check=True, capture_output=True,
    )
    shutil.copy(OFFICIAL_A / "config.json", folder / "config.json")
    return folder


@pytest.fixture(scope="session")
def official_a_model(official_a_dir):
    from jfexport.reference.checkpoint import load_checkpoint

    return load_checkpoint(official_a_dir)


@pytest.fixture(scope="session")
def golden_a():
    from jfexport.reference.golden import GoldenFile

    if not (OFFICIAL_A / "golden.safetensors").is_file():
        pytest.skip(f"golden fixtures not found at {OFFICIAL_A}")
    return GoldenFile(OFFICIAL_A / "golden.safetensors")


@pytest.fixture(scope="session")
def tiny_bundle():
    from jfexport.reference.bundle import load_preset

    return load_preset("tiny")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """The tiny preset exported once per session, fp32 + typed fp16 (the exporter consumes its bundle)."""
    from jfexport.export.exporter import export_all
    from jfexport.reference.bundle import load_preset

    out = tmp_path_factory.mktemp("engines-tiny")
    return out, export_all(load_preset("tiny"), out, precisions=("fp32", "fp16")).to_json()
