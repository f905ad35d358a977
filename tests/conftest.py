"""Shared fixtures: the official-A golden checkpoint (regenerated, never stored), the tiny preset, and the
two builds the suite reads (each built once per session: a test that builds into a folder or changes one
of its files works on its own copy)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OFFICIAL_A = SHARED / "fixtures" / "official-A"
# Set to make a missing ../shared a failure instead of a skip (a checkout that must run the parity tests).
REQUIRE_SHARED = os.environ.get("JFEXPORT_REQUIRE_SHARED") == "1"
_missing_shared: list[str] = []


def shared_present(path: Path) -> bool:
    """Whether a fixture file from ../shared exists. A missing one is named in the run's summary, so
    parity tests never vanish unnoticed, and fails the test under JFEXPORT_REQUIRE_SHARED=1."""
    if path.exists():
        return True
    _missing_shared.append(str(path))
    if REQUIRE_SHARED:
        pytest.fail(f"{path} not found: the official golden fixtures live in ../shared beside the repository "
                    "(JFEXPORT_REQUIRE_SHARED=1)")
    return False


def need_shared(path: Path) -> None:
    """Skip a test whose fixture file from ../shared is absent (see `shared_present`)."""
    if not shared_present(path):
        pytest.skip(f"{path} not found: the official golden fixtures live in ../shared beside the repository")


def pytest_terminal_summary(terminalreporter) -> None:
    if _missing_shared:
        terminalreporter.write_sep("!", "tests against the official implementation were skipped: ../shared is "
                                        "incomplete (JFEXPORT_REQUIRE_SHARED=1 makes this a failure)", red=True)
        for path in sorted(set(_missing_shared)):
            terminalreporter.write_line(f"missing: {path}")


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `jfexport` in a fresh process, as a user would (exit codes, stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "jfexport.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="session")
def official_a_dir(tmp_path_factory) -> Path:
    """config.json + model.safetensors of official-A, regenerated bit-exactly from its manifest."""
    need_shared(OFFICIAL_A / "manifest.json")
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

    need_shared(OFFICIAL_A / "golden.safetensors")
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


def copy_build(src: Path, dst: Path) -> Path:
    """A copy of a build folder to build into or change: the tokenizer link kept as a link, and none of the
    verified stamps that runtimes opened on the original wrote (the copy's first start hashes, as a user's
    copy's would)."""
    from jfexport.runtime.folder_files import STAMPS

    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(STAMPS))
    return dst


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> Path:
    """The tiny preset built once per session (fp32, ONNX Runtime)."""
    from jfexport.export.build import build
    from jfexport.reference.bundle import load_preset

    out = tmp_path_factory.mktemp("tiny-build") / "engines"
    build(load_preset("tiny"), out)
    return out


@pytest.fixture(scope="session")
def default_build(tmp_path_factory) -> Path:
    """The bundled default model built once per session by `jfexport build`, as a user builds it."""
    out = tmp_path_factory.mktemp("default-build") / "engines"
    res = run_cli("build", "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out
