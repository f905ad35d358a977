"""A build folder you can trust: builds are all-or-nothing, locked, and never destroy what they did not write.

Kill tests use real signals on a real `jfexport build` process; the full disk is a real tmpfs.
The suite's tiny build is copied for each case.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jfexport.export.build import build, previous_manifest
from jfexport.export.build_folder import LOCK, BuildFolderError, BuildLockedError
from jfexport.reference.bundle import load_preset
from jfexport.runtime.folder_files import STAMPS
from jfexport.runtime.pipelines import JanusFlowRuntime

from jfexport.core.manifest import EnginesError

from .conftest import REPO, run_cli

STAGING_PREFIX = ".jfexport-staging-"


@pytest.fixture(scope="module")
def base(tiny_build) -> Path:
    return tiny_build


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
    # SIGINT as a terminal delivers it: a suite started in the background (`pytest &`) inherits SIGINT
    # ignored, and Python keeps an ignored SIGINT ignored, so the build would run on to its end.
    proc = subprocess.Popen([sys.executable, "-m", "jfexport.cli", "build", "--out", str(out), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:
        # vision_encoder exported and validated (at fp32, or at fp16 alone beside fp32 graphs it keeps)
        if line.startswith("embed_tokens [") and line.rstrip().endswith("]: exporting"):
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
    assert build(load_preset("tiny"), out, progress=messages.append).rebuilt == []  # the tiny build survived whole
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
    assert build(load_preset("tiny"), out).rebuilt == []  # rewrites the manifest, with the same graphs
    after = _snapshot(out)
    assert after.pop("manifest.json") and before.pop("manifest.json")
    assert after == before and _staging_folders(out) == []


def test_killed_after_the_commit_the_next_build_retires_the_old_files(base, base_latents, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    _build_killed_at(out, "committed:")
    assert (out / "gen_encoder.onnx").is_file()  # the previous build's file, not yet removed
    assert not torch.equal(_latents(out), base_latents)  # the new build is the one served
    assert build(_changed_tiny(), out).rebuilt == []
    assert not (out / "gen_encoder.onnx").exists() and _staging_folders(out) == []


@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, 130, "aborted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupted_fp16_rebuild_cleans_up_and_keeps_the_previous_build(base, base_latents, tmp_path, sig, code, said):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    before = _snapshot(out)
    proc = _start_build(out, "--preset", "tiny", "--fp16")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and said in err, err
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
    assert manifest.rebuilt == ["gen_encoder"]
    assert not (out / "gen_encoder.onnx").exists()  # the previous build's own file is retired...
    moved = manifest.graphs["gen_encoder"].files["fp32"].file
    assert moved.startswith("build-") and (out / moved).is_file()  # ...after its successor went in beside it

    # The name is free again; a file of the user's there is not the build's to replace.
    (out / "gen_encoder.onnx").write_bytes(b"my graph")
    mine["gen_encoder.onnx"] = b"my graph"
    manifest = build(load_preset("tiny"), out)
    assert manifest.rebuilt == ["gen_encoder"]
    assert manifest.graphs["gen_encoder"].files["fp32"].file not in ("gen_encoder.onnx", moved)
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


@pytest.mark.parametrize("make", ["symlink", "hardlink", "fifo"])
def test_a_lock_that_is_not_a_file_of_its_own_is_refused_and_left_alone(tmp_path, make):
    """The lock is truncated and rewritten: through a link it would empty the link's target (a user's file)."""
    out = tmp_path / "engines"
    out.mkdir()
    precious = tmp_path / "notes.txt"
    precious.write_text("precious user data")
    lock = out / ".jfexport.lock"
    if make == "symlink":
        lock.symlink_to(precious)
    elif make == "hardlink":
        os.link(precious, lock)
    else:
        os.mkfifo(lock)
    with pytest.raises(BuildFolderError, match=f"{re.escape(str(lock))}: cannot use it as the build lock"):
        build(load_preset("tiny"), out)
    assert precious.read_text() == "precious user data"
    assert sorted(p.name for p in out.iterdir()) == [".jfexport.lock"]


def test_a_manifest_path_holding_a_folder_is_named_before_any_export(tmp_path):
    out = tmp_path / "engines"
    (out / "manifest.json").mkdir(parents=True)
    (out / "manifest.json" / "mine.txt").write_text("kept")
    messages: list[str] = []
    with pytest.raises(BuildFolderError, match=f"{re.escape(str(out / 'manifest.json'))}: is a folder"):
        build(load_preset("tiny"), out, progress=messages.append)
    assert not [m for m in messages if "exporting" in m] and (out / "manifest.json" / "mine.txt").read_text() == "kept"


def test_export_into_a_build_folder_is_refused(base, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    before = _snapshot(out)
    res = run_cli("export", "--preset", "tiny", "--graphs", "embed_tokens", "--out", str(out))
    assert res.returncode == 2 and f"{out}: holds a `jfexport build`" in res.stderr, res.stderr
    assert _snapshot(out) == before
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format"] = "jfexport-manifest/2"  # a build this version cannot read is still a build
    (out / "manifest.json").write_text(json.dumps(manifest))
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


# The tokenizer is placed like the graphs: a fresh `tokenizer-<id>/` recorded in the manifest, `tokenizer`
# a link to it. A build with another tokenizer (and one changed weight) that kills itself with SIGKILL right
# before or right after the rename named in argv[3] ("before"/"after") onto argv[4] (manifest.json, or
# tokenizer: the link), with the tokenizer folder argv[2].
KILL_AROUND = """
import os, signal, sys, torch
from pathlib import Path
from jfexport.export.build import build
from jfexport.reference.bundle import load_preset
bundle = load_preset("tiny")
bundle.processor_folder = Path(sys.argv[2])
with torch.no_grad():
    bundle.model.vision_gen_enc_aligner.bias.add_(0.5)
when, target = sys.argv[3], sys.argv[4]
replace = os.replace
def killing_replace(src, dst, *args, **kwargs):
    if Path(dst).name == target and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst, *args, **kwargs)
    if Path(dst).name == target and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = killing_replace
build(bundle, sys.argv[1])
"""

MARKER = "jfexport-test-other-tokenizer"


@pytest.fixture
def other_tokenizer(tmp_path) -> Path:
    """The tiny preset's tokenizer files with one of them changed (another key in tokenizer_config.json)."""
    folder = tmp_path / "other-tokenizer"
    shutil.copytree(load_preset("tiny").processor_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config[MARKER] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _linked_copy(base: Path, out: Path) -> Path:
    shutil.copytree(base, out, symlinks=True)  # keeps `tokenizer` a link, as the build made it
    return out


def _served_tokenizer_config(folder: Path) -> str:
    from jfexport.runtime.engines_folder import load_engines

    tokenizer = load_engines(folder, device="cpu", graphs=["embed_tokens"])[0].tokenizer  # what the processor reads
    return (tokenizer / "tokenizer_config.json").read_text()


def test_a_build_places_its_tokenizer_in_a_fresh_folder_recorded_in_the_manifest(base):
    manifest = json.loads((base / "manifest.json").read_text())
    where = manifest["tokenizer_dir"]
    assert where.startswith("tokenizer-") and os.readlink(base / "tokenizer") == where
    assert sorted(p.name for p in (base / where).iterdir()) == sorted(manifest["tokenizer"])


def _build_killed_around(out: Path, tokenizer: Path, when: str, target: str) -> None:
    res = subprocess.run([sys.executable, "-c", KILL_AROUND, str(out), str(tokenizer), when, target], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr


def test_killed_right_before_the_manifest_replace_serves_the_old_build_whole(base, base_latents, other_tokenizer,
                                                                             tmp_path):
    out = _linked_copy(base, tmp_path / "engines")
    before = _snapshot(out)
    _build_killed_around(out, other_tokenizer, "before", "manifest.json")
    assert (out / "manifest.json").read_bytes() == (base / "manifest.json").read_bytes()
    assert torch.equal(_latents(out), base_latents)  # every file checked against the old manifest: served
    assert MARKER not in _served_tokenizer_config(out)
    # Everything of the new build is in place, under fresh names, beside the old build: its tokenizer too.
    placed = set(_snapshot(out)) - set(before)
    assert any(p.endswith("/tokenizer_config.json") for p in placed) and any(p.endswith(".onnx") for p in placed)

    assert build(load_preset("tiny"), out).rebuilt == []  # the old build, complete; the placed files go
    after = _snapshot(out)
    assert after.pop("manifest.json") and before.pop("manifest.json")
    assert after == before and _staging_folders(out) == []


def test_killed_right_after_the_manifest_replace_serves_the_new_build_whole(base, base_latents, other_tokenizer,
                                                                            tmp_path):
    out = _linked_copy(base, tmp_path / "engines")
    old_dir = json.loads((base / "manifest.json").read_text())["tokenizer_dir"]
    _build_killed_around(out, other_tokenizer, "after", "manifest.json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer_dir"] != old_dir and os.readlink(out / "tokenizer") == old_dir  # the kill's window
    latents = _latents(out)  # the tokenizer and every graph checked against the new manifest
    assert not torch.equal(latents, base_latents)
    assert MARKER in _served_tokenizer_config(out)
    assert os.readlink(out / "tokenizer") == old_dir  # opening the folder wrote nothing: the next build repoints it

    bundle = _changed_tiny()
    bundle.processor_folder = other_tokenizer
    assert build(bundle, out).rebuilt == []
    assert not (out / old_dir).exists() and not (out / "gen_encoder.onnx").exists()  # retired by the next build
    assert _staging_folders(out) == []


def test_killed_between_the_manifest_and_the_link_the_next_build_repoints_it(base, other_tokenizer, tmp_path):
    out = _linked_copy(base, tmp_path / "engines")
    _build_killed_around(out, other_tokenizer, "after", "manifest.json")
    bundle = _changed_tiny()
    bundle.processor_folder = other_tokenizer
    manifest = build(bundle, out)  # before any runtime opened the folder
    assert manifest.rebuilt == [] and os.readlink(out / "tokenizer") == manifest.tokenizer_dir
    assert MARKER in _served_tokenizer_config(out)
    JanusFlowRuntime.from_engines(out)


def test_an_older_format_build_with_the_tokenizer_at_the_fixed_path_is_refused_then_rebuilt_and_converted(
        base, base_latents, other_tokenizer, tmp_path):
    out = _linked_copy(base, tmp_path / "engines")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "tokenizer").unlink()
    (out / manifest.pop("tokenizer_dir")).rename(out / "tokenizer")  # the layout builds wrote before
    manifest["format"] = "jfexport-manifest/2"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EnginesError, match=r"format 'jfexport-manifest/2', this runtime reads 'jfexport-manifest/3' "
                                           r"\(.*\): rebuild the engines"):
        JanusFlowRuntime.from_engines(out)

    bundle = load_preset("tiny")
    messages: list[str] = []
    rebuilt = build(bundle, out, progress=messages.append)
    assert set(rebuilt.rebuilt) == _all_graphs(base)  # nothing of an older format is reused
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and "format 'jfexport-manifest/2'" in warnings[0], messages
    # The files at the fixed path were the build's own bytes: retired, the path made the link.
    assert os.readlink(out / "tokenizer") == rebuilt.tokenizer_dir
    assert torch.equal(_latents(out), base_latents)
    bundle.processor_folder = other_tokenizer
    manifest = build(bundle, out)
    assert manifest.rebuilt == [] and os.readlink(out / "tokenizer") == manifest.tokenizer_dir
    assert MARKER in _served_tokenizer_config(out)
    JanusFlowRuntime.from_engines(out)


# A rebuild trusts its folder's previous manifest only as far as a runtime would: schema, paths inside.


def _all_graphs(folder: Path) -> set[str]:
    return set(json.loads((folder / "manifest.json").read_text())["graphs"])


_MALFORMED = [
    (lambda m: m["graphs"]["llm_decode"].update(files=["x"]), r"graphs\.llm_decode\.files: expected an object"),
    (lambda m: m["graphs"]["gen_encoder"]["files"]["fp32"].pop("sha256"),
     r"graphs\.gen_encoder\.files\.fp32\.sha256: missing"),
    (lambda m: m["tokenizer"].update({"../../victim": "0" * 64}), r"tokenizer\.\.\./\.\./victim: expected a file"),
]
_MALFORMED_IDS = ["wrong-type", "missing-key", "tokenizer-name-escapes"]


def _malformed_copy(base: Path, tmp_path: Path, change) -> Path:
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("change,key", _MALFORMED, ids=_MALFORMED_IDS)
def test_a_malformed_previous_manifest_is_not_trusted_and_named(base, tmp_path, change, key):
    out = _malformed_copy(base, tmp_path, change)
    messages: list[str] = []
    assert previous_manifest(out, messages.append) is None
    assert len(messages) == 1 and re.search(rf"manifest\.json: {key}", messages[0]), messages
    assert "none of its files are removed" in messages[0]


def test_a_build_over_a_malformed_manifest_rebuilds_everything_and_removes_nothing(base, tmp_path):
    """What `build` does with a previous manifest it does not trust, which every malformation above leads
    to (one full build, for the case whose bad record names a path outside the folder)."""
    change, key = _MALFORMED[_MALFORMED_IDS.index("tokenizer-name-escapes")]
    out = _malformed_copy(base, tmp_path, change)
    victim = tmp_path / "victim"
    victim.write_text("not the build's")
    old = _snapshot(out)
    messages: list[str] = []
    rebuilt = build(load_preset("tiny"), out, progress=messages.append).rebuilt
    assert set(rebuilt) == _all_graphs(base)  # nothing reused from the bad records
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and re.search(rf"manifest\.json: {key}", warnings[0]), messages
    del old["manifest.json"]
    assert {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in old} == old  # every old file still there
    assert victim.read_text() == "not the build's"
    JanusFlowRuntime.from_engines(out)


def test_previous_manifest_paths_leaving_the_folder_are_neither_reused_nor_removed(base, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    outside = tmp_path / "outside.onnx"
    shutil.copy(out / "llm_decode.onnx", outside)  # the right graph with the right hash, outside the folder
    victim = tmp_path / "victim.onnx"
    victim.write_bytes(b"someone else's file")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["llm_decode"]["files"]["fp32"]["file"] = "../outside.onnx"
    manifest["graphs"]["gen_encoder"]["files"]["fp32"]["file"] = str(victim)  # absolute, and stale
    (out / "manifest.json").write_text(json.dumps(manifest))
    messages: list[str] = []
    new = build(_changed_tiny(), out, progress=messages.append)
    assert set(new.rebuilt) == _all_graphs(base)
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and ("graphs.llm_decode.files.fp32.file: the manifest names '../outside.onnx'" in
                                   warnings[0] or f"graphs.gen_encoder.files.fp32.file: the manifest names '{victim}'"
                                   in warnings[0]), messages
    assert victim.read_bytes() == b"someone else's file" and outside.is_file()
    named = [f.file for g in new.graphs.values() for f in g.files.values()]
    assert all(not os.path.isabs(n) and ".." not in Path(n).parts for n in named)
    assert (out / "llm_decode.onnx").is_file()  # the old build's file stays: no manifest we trust listed it
    JanusFlowRuntime.from_engines(out)


def test_a_rebuild_after_a_graph_file_was_deleted_by_hand_rebuilds_that_graph(base, base_latents, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(base, out)
    (out / "gen_decoder.onnx").unlink()
    assert build(load_preset("tiny"), out).rebuilt == ["gen_decoder"]
    assert torch.equal(_latents(out), base_latents)
