"""A build folder you can trust: builds are all-or-nothing, locked, and never destroy what they did not write.

Kill tests use real signals on a real `jfexport build` process; the full disk is a real tmpfs.
One tiny build per module is copied for each case.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jfexport.export.build import build
from jfexport.export.build_folder import LOCK, BuildFolderError, BuildLockedError
from jfexport.reference.bundle import load_preset
from jfexport.runtime.engines_folder import EnginesError
from jfexport.runtime.folder_files import STAMPS
from jfexport.runtime.pipelines import JanusFlowRuntime

from .conftest import REPO, run_cli

STAGING_PREFIX = ".jfexport-staging-"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "engines"
    build(load_preset("tiny"), out)
    return out


@pytest.fixture(scope="module")
def base_latents(base) -> torch.Tensor:
    return _latents(base)


def _latents(folder: Path) -> torch.Tensor:
    return JanusFlowRuntime.from_engines(folder).generate_latents(["a red circle"], n=1, steps=2, seed=1)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file of `folder` with its sha256, but the lock file, staging folders (a build's scratch) and
    the runtime's verified stamps (written by whoever opens the build)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (LOCK, STAMPS)
            and not p.relative_to(folder).parts[0].startswith(STAGING_PREFIX)}


def _staging_folders(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX)]


def _start_build(out: Path, *args: str) -> subprocess.Popen:
    """`jfexport build` in its own process, stopped once it is mid-build: its first graph is done."""
    proc = subprocess.Popen([sys.executable, "-m", "jfexport.cli", "build", "--out", str(out), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("embed_tokens [fp32]: exporting"):  # vision_encoder exported and validated
            return proc
    proc.wait()
    pytest.fail(f"build ended before reaching its second graph (exit {proc.returncode})")


def test_killed_rebuild_keeps_the_previous_build_and_holds_off_a_second_build(base, base_latents, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    before = _snapshot(out)
    first = _start_build(out)  # the bundled default model: every graph differs from the tiny build's
    first.send_signal(signal.SIGSTOP)  # alive and holding the lock however long the second build takes to start
    with pytest.raises(BuildLockedError, match=f"another build \\(pid {first.pid}\\)"):
        build(load_preset("tiny"), out)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert _snapshot(out) == before  # old manifest, old graphs: none of the default model's graphs in place
    assert _staging_folders(out), "the killed build had staged nothing: the kill came too late to test anything"
    assert torch.equal(_latents(out), base_latents)

    messages: list[str] = []
    assert build(load_preset("tiny"), out, progress=messages.append)["rebuilt"] == []  # the tiny build survived whole
    assert any(f"taking over the lock left by pid {first.pid} (no longer running)" in m for m in messages)
    assert any("removed the staging folder of an interrupted build" in m for m in messages)
    assert _staging_folders(out) == [] and _snapshot(out).keys() == before.keys()


# A build of the tiny model with one changed weight (gen_encoder is rebuilt) that kills itself with
# SIGKILL on the progress line starting with argv[2]: the moments a timed kill from outside cannot hit.
KILL_AT = """
import os, signal, sys, torch
from jfexport.export.build import build
from jfexport.reference.bundle import load_preset
bundle = load_preset("tiny")
with torch.no_grad():
    bundle.model.vision_gen_enc_aligner.bias.add_(0.5)
def progress(msg):
    if msg.startswith(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
build(bundle, sys.argv[1], progress=progress)
"""


def _changed_tiny():
    bundle = load_preset("tiny")
    with torch.no_grad():
        bundle.model.vision_gen_enc_aligner.bias.add_(0.5)
    return bundle


def _build_killed_at(out: Path, line: str) -> None:
    res = subprocess.run([sys.executable, "-c", KILL_AT, str(out), line], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr


def test_killed_with_new_graphs_in_place_before_the_commit(base, base_latents, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    before = _snapshot(out)
    _build_killed_at(out, "commit:")
    placed = set(_snapshot(out)) - set(before)
    assert len(placed) == 1 and placed.pop().endswith("/gen_encoder.onnx")  # beside the live build, unlisted
    assert (out / "manifest.json").read_bytes() == (base / "manifest.json").read_bytes()
    assert torch.equal(_latents(out), base_latents)
    assert build(load_preset("tiny"), out)["rebuilt"] == []  # rewrites the manifest, with the same graphs
    after = _snapshot(out)
    assert after.pop("manifest.json") and before.pop("manifest.json")
    assert after == before and _staging_folders(out) == []


def test_killed_after_the_commit_the_next_build_retires_the_old_files(base, base_latents, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    _build_killed_at(out, "committed:")
    assert (out / "gen_encoder.onnx").is_file()  # the previous build's file, not yet removed
    assert not torch.equal(_latents(out), base_latents)  # the new build is the one served
    assert build(_changed_tiny(), out)["rebuilt"] == []
    assert not (out / "gen_encoder.onnx").exists() and _staging_folders(out) == []


def test_interrupted_fp16_rebuild_cleans_up_and_keeps_the_previous_build(base, base_latents, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    before = _snapshot(out)
    proc = _start_build(out, "--preset", "tiny", "--fp16")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "aborted" in err, err
    assert _snapshot(out) == before and _staging_folders(out) == []
    assert torch.equal(_latents(out), base_latents)


def test_killed_first_build_leaves_no_build_and_the_next_writer_cleans_up(tmp_path):
    out = tmp_path / "engines"
    proc = _start_build(out, "--preset", "tiny")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert [p.name for p in out.iterdir() if p.suffix == ".onnx"] == []
    assert _staging_folders(out)
    with pytest.raises(EnginesError, match="no manifest.json"):
        JanusFlowRuntime.from_engines(out)
    # `export` takes the same lock and cleans up after killed builds too (and is quicker than a build).
    res = run_cli("export", "--preset", "tiny", "--graphs", "embed_tokens", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "removed the staging folder of an interrupted build" in res.stderr and _staging_folders(out) == []


def test_a_build_never_removes_or_replaces_files_it_did_not_write(base, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    mine = {"notes.onnx": b"my notes", "weights.data": b"my weights", "prod.engine": b"my engine",
            "tokenizer/notes.txt": b"my tokenizer notes"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    manifest = build(_changed_tiny(), out)
    assert manifest["rebuilt"] == ["gen_encoder"]
    assert not (out / "gen_encoder.onnx").exists()  # the previous build's own file is retired...
    moved = manifest["graphs"]["gen_encoder"]["files"]["fp32"]["file"]
    assert moved.startswith("build-") and (out / moved).is_file()  # ...after its successor went in beside it

    # The name is free again; a file of the user's there is not the build's to replace.
    (out / "gen_encoder.onnx").write_bytes(b"my graph")
    mine["gen_encoder.onnx"] = b"my graph"
    manifest = build(load_preset("tiny"), out)
    assert manifest["rebuilt"] == ["gen_encoder"]
    assert manifest["graphs"]["gen_encoder"]["files"]["fp32"]["file"] not in ("gen_encoder.onnx", moved)
    assert not (out / moved).parent.exists()  # the emptied subfolder of the earlier build went with its file
    assert {name: (out / name).read_bytes() for name in mine} == mine
    JanusFlowRuntime.from_engines(out)


def test_a_failed_build_takes_back_the_graphs_it_had_placed(base, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    # Made an export folder (no backend, no tokenizer record) whose tokenizer file someone edited:
    # the build finds out only after placing its new graph.
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["backend"], manifest["tokenizer"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "tokenizer" / "tokenizer_config.json").write_text("{}")
    before = _snapshot(out)
    with pytest.raises(BuildFolderError, match="tokenizer_config.json"):
        build(_changed_tiny(), out)
    assert _snapshot(out) == before and _staging_folders(out) == []
    assert [p.name for p in out.iterdir() if p.name.startswith("build-")] == []


def test_export_into_a_build_folder_is_refused(base, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    before = _snapshot(out)
    res = run_cli("export", "--preset", "tiny", "--graphs", "embed_tokens", "--out", str(out))
    assert res.returncode == 2 and f"{out}: holds a `jfexport build`" in res.stderr, res.stderr
    assert _snapshot(out) == before


def test_out_that_is_a_file_or_unwritable_is_named(tmp_path):
    blocker = tmp_path / "engines"
    blocker.write_text("not a folder")
    res = run_cli("build", "--preset", "tiny", "--out", str(blocker))
    assert res.returncode == 2 and f"error: {blocker}: output folder is not writable: it is a file" in res.stderr
    assert "Traceback" not in res.stderr and blocker.read_text() == "not a folder"

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if os.geteuid() == 0:  # root writes through file modes: a read-only mount is what stops it
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)]).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        readonly.chmod(0o555)
    try:
        with pytest.raises(BuildFolderError, match=f"^{readonly}: output folder is not writable"):
            build(load_preset("tiny"), readonly)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(readonly)], check=True)


def test_full_disk_mid_rebuild_is_named_and_keeps_the_previous_build(base, base_latents, tmp_path):
    """A real full disk: a tmpfs with room for the tiny build and a little more."""
    out = tmp_path / "engines"
    out.mkdir()
    size_kib = sum(p.stat().st_size for p in base.rglob("*") if p.is_file()) // 1024 + 600
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(out)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        shutil.copytree(base, out, dirs_exist_ok=True)
        before = _snapshot(out)
        res = run_cli("build", "--out", str(out))  # the default model: every graph is rewritten
        assert res.returncode == 2, res.stderr
        assert f"error: {out}" in res.stderr and "the disk is full" in res.stderr and "Traceback" not in res.stderr
        assert _snapshot(out) == before and _staging_folders(out) == []
        assert torch.equal(_latents(out), base_latents)
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_max_seq_beyond_the_models_positions_is_refused(tmp_path):
    res = run_cli("build", "--preset", "tiny", "--max-seq", "2000", "--out", str(tmp_path / "engines"))
    assert res.returncode == 2 and "--max-seq 2000" in res.stderr and "max_position_embeddings 1024" in res.stderr
    assert not (tmp_path / "engines").exists()
