"""The runtime checks what it loads (issue 10): file hashes with verified stamps, paths confined to the
build folder, the manifest schema, limits against the model, graph subsets, the precision verify holds
engines to, and the CPU fallback where onnxruntime has no CUDA provider. Real builds, real ONNX Runtime."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from jfexport.export.build import build
from jfexport.reference.bundle import load_preset
from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
from jfexport.runtime.backends.ort_backend import OrtEngine
from jfexport.runtime.engines_folder import GENERATION_GRAPHS, UNDERSTANDING_GRAPHS, load_engines, pick_precision
from jfexport.runtime.folder_files import STAMPS
from jfexport.runtime.pipelines import JanusFlowRuntime
from onnx import numpy_helper

from jfexport.core.manifest import EnginesError, Limits, Manifest
from jfexport.tools.verify import verify

from .conftest import copy_build, run_cli

ALL_GRAPHS = set(GENERATION_GRAPHS) | set(UNDERSTANDING_GRAPHS)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_build) -> Path:
    """One fp32 + fp16 tiny build (the suite's fp32 build, its graphs reused, with fp16 added); every test
    works on its own copy."""
    out = tmp_path_factory.mktemp("trust") / "build"
    copy_build(tiny_build, out)
    build(load_preset("tiny"), out, fp16=True, limits=Limits(max_batch=16, max_seq=1024))
    return out


@pytest.fixture
def folder(built, tmp_path) -> Path:
    copy = tmp_path / "engines"
    shutil.copytree(built, copy)
    return copy


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def hows(engines) -> dict[str, list[str]]:
    return {graph: [check.how for check in checks] for graph, checks in engines.files.items()}


def min_feeds(spec: dict) -> dict[str, torch.Tensor]:
    """Inputs at every dim's minimum (P = 0: an empty past), zeros of the declared dtype."""
    dims = {name: max(d["min"], 1) if name != "P" else d["min"] for name, d in spec["dims"].items()}
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    feeds = {}
    for t in spec["inputs"]:
        shape = [d if isinstance(d, int) else sum(dims[p.strip()] for p in d.split("+")) for d in t["shape"]]
        feeds[t["name"]] = torch.zeros(shape, dtype=dtypes[t["dtype"]])
    return feeds


def flip_byte_keeping_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the fast path must not rely on mtime alone


def other_weights(path: Path, out: Path) -> None:
    """The same graph (architecture, file size) with one weight changed: what another build would hold."""
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    changed = numpy_helper.to_array(init).copy()
    changed.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(changed, init.name))
    onnx.save(model, str(out))


# 1. every served file is checked against the manifest; later starts trust verified stamps


def test_first_start_hashes_later_starts_trust_stamps_and_verify_files_hashes_again(folder):
    first, _, _ = load_engines(folder, device="cpu")
    assert set(first) == ALL_GRAPHS
    recorded = read_manifest(folder)["tokenizer"]
    assert {c.file.name.split("/")[-1] for c in first.files["tokenizer"]} == set(recorded) != set()  # tokenizer too
    assert {h for files in hows(first).values() for h in files} == {"sha256"}
    assert (folder / STAMPS).is_file()
    second, _, _ = load_engines(folder, device="cpu")
    assert {h for files in hows(second).values() for h in files} == {"stamp"}
    forced, _, _ = load_engines(folder, device="cpu", verify_files=True)
    assert {h for files in hows(forced).values() for h in files} == {"sha256"}


def _flip(folder: Path) -> str:
    flip_byte_keeping_mtime(folder / "llm_decode.onnx")
    return "llm_decode.onnx"


def _other_build(folder: Path) -> str:
    other = folder.parent / "other.onnx"
    other_weights(folder / "llm_decode.onnx", other)
    shutil.copy(other, folder / "llm_decode.onnx")
    return "llm_decode.onnx"


def _swap(folder: Path) -> str:
    a, b = folder / "gen_encoder.onnx", folder / "gen_decoder.onnx"
    a.rename(folder / "tmp.onnx")
    b.rename(a)
    (folder / "tmp.onnx").rename(b)
    return "gen_(en|de)coder.onnx"


def _grown(folder: Path) -> str:
    path = folder / "vae_decoder.onnx"
    st = path.stat()
    with open(path, "ab") as f:
        f.write(b"\0")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return "vae_decoder.onnx"


def _tokenizer_edited(folder: Path) -> str:
    where = read_manifest(folder)["tokenizer_dir"]  # the folder the runtime reads
    path = folder / where / "tokenizer.json"
    path.write_text(path.read_text() + " ")  # trailing whitespace: still valid JSON, another tokenizer file
    return f"{where}/tokenizer.json"


@pytest.mark.parametrize("change", [_flip, _other_build, _swap, _grown, _tokenizer_edited],
                         ids=["flipped-byte", "other-build", "swapped", "grown", "tokenizer"])
def test_a_changed_file_is_refused_after_stamps_were_recorded(folder, change):
    load_engines(folder, device="cpu")  # records verified stamps: the next start takes the fast path
    file_pattern = change(folder)
    owner = r"(llm_decode|gen_encoder|gen_decoder|vae_decoder|tokenizer)"
    with pytest.raises(EnginesError, match=rf"{owner}: .*{file_pattern} does not match the manifest"):
        load_engines(folder, device="cpu")


@pytest.mark.parametrize("a,b", [("gen_encoder", "gen_decoder"), ("embed_tokens", "llm_prefill")])
def test_graph_files_swapped_with_their_hashes_are_refused_at_open(folder, a, b):
    """A manifest whose file records (name, hash, size) were swapped between two graphs passes every hash
    check: the files' own tensors tell them apart, at open and not as a missing input mid-request."""
    manifest = read_manifest(folder)
    first, second = manifest["graphs"][a]["files"]["fp32"], manifest["graphs"][b]["files"]["fp32"]
    for key in ("file", "sha256", "size", "external_data"):
        if key in first or key in second:
            first[key], second[key] = second.get(key), first.get(key)
    write_manifest(folder, manifest)
    with pytest.raises(EnginesError, match=rf"listed as graph ({a}|{b}), but it is not that graph"):
        load_engines(folder, device="cpu")


def test_a_size_the_manifest_records_is_compared_on_every_start(folder):
    manifest = read_manifest(folder)
    info = manifest["graphs"]["embed_tokens"]["files"]["fp32"]
    info["size"] = (folder / info["file"]).stat().st_size
    write_manifest(folder, manifest)
    load_engines(folder, device="cpu", graphs=["embed_tokens"])
    info["size"] += 1
    write_manifest(folder, manifest)
    with pytest.raises(EnginesError,
                       match=r"embed_tokens: .*embed_tokens.onnx does not match the manifest \(\d+ bytes, it records \d+\)"):
        load_engines(folder, device="cpu", graphs=["embed_tokens"])


def _to_external_data(folder: Path, hashed: bool) -> dict:
    """llm_decode with its weights in an external-data file, as the exporter writes graphs over 2 GB."""
    import hashlib

    model = onnx.load(str(folder / "llm_decode.onnx"))
    onnx.save_model(model, str(folder / "llm_decode.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="llm_decode.onnx.data")
    manifest = read_manifest(folder)
    info = manifest["graphs"]["llm_decode"]["files"]["fp32"]
    info["sha256"] = hashlib.sha256((folder / "llm_decode.onnx").read_bytes()).hexdigest()
    info["size"] = (folder / "llm_decode.onnx").stat().st_size
    data = folder / "llm_decode.onnx.data"
    info["external_data"] = [{"file": data.name, "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                              "size": data.stat().st_size} if hashed else data.name]
    write_manifest(folder, manifest)
    return manifest


def test_external_data_files_are_checked_too(folder, built):
    manifest = _to_external_data(folder, hashed=True)
    engines, _, _ = load_engines(folder, device="cpu", graphs=["llm_decode"])
    assert hows(engines)["llm_decode"] == ["sha256", "sha256"]
    feeds = min_feeds(manifest["graphs"]["llm_decode"]["spec"])
    expected = OrtEngine("llm_decode", built / "llm_decode.onnx").run(feeds)["logits"]
    assert torch.equal(engines["llm_decode"].run(feeds)["logits"], expected)  # ONNX Runtime read the external data
    flip_byte_keeping_mtime(folder / "llm_decode.onnx.data")
    with pytest.raises(EnginesError, match=r"llm_decode: .*llm_decode.onnx.data does not match the manifest"):
        load_engines(folder, device="cpu", graphs=["llm_decode"])


def test_external_data_listed_by_name_only_is_refused_naming_the_entry(folder):
    _to_external_data(folder, hashed=False)  # format 2 allowed it (unchecked); format 3 hashes every file
    with pytest.raises(EnginesError, match=r"manifest\.json: graphs\.llm_decode\.files\.fp32\.external_data\[0\]: "
                                           r"expected an object, got \"llm_decode\.onnx\.data\""):
        load_engines(folder, device="cpu", graphs=["llm_decode"])
    assert not (folder / STAMPS).exists()


def _make_read_only(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    res = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot make a read-only folder here as root ({res.stderr.decode().strip()})")


def _make_writable(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o755)
    else:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_folder_keeps_its_stamps_in_the_user_cache(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _make_read_only(folder)
    try:
        first, _, _ = load_engines(folder, device="cpu", graphs=["embed_tokens"])
        second, _, _ = load_engines(folder, device="cpu", graphs=["embed_tokens"])
    finally:
        _make_writable(folder)
    assert hows(first)["embed_tokens"] == ["sha256"] and hows(second)["embed_tokens"] == ["stamp"]
    assert not (folder / STAMPS).exists()
    assert len(list((tmp_path / "cache" / "jfexport" / "verified").glob("*.json"))) == 1


# 2. manifest paths are confined to the folder


def _absolute(folder: Path) -> tuple[str, str]:
    manifest = read_manifest(folder)
    manifest["graphs"]["llm_decode"]["files"]["fp32"]["file"] = "/etc/passwd"
    write_manifest(folder, manifest)
    return "llm_decode", "'/etc/passwd'"


def _dotdot(folder: Path) -> tuple[str, str]:
    shutil.copy(folder / "llm_decode.onnx", folder.parent / "outside.onnx")  # a valid graph, with the right hash
    manifest = read_manifest(folder)
    manifest["graphs"]["llm_decode"]["files"]["fp32"]["file"] = "../outside.onnx"
    write_manifest(folder, manifest)
    return "llm_decode", "'../outside.onnx'"


def _symlink_out(folder: Path) -> tuple[str, str]:
    (folder / "llm_decode.onnx").rename(folder.parent / "outside.onnx")
    (folder / "llm_decode.onnx").symlink_to(folder.parent / "outside.onnx")
    return "llm_decode", "'llm_decode.onnx'"


def _tokenizer_file_out(folder: Path) -> tuple[str, str]:
    where = read_manifest(folder)["tokenizer_dir"]
    (folder / where / "tokenizer.json").rename(folder.parent / "tokenizer.json")
    (folder / where / "tokenizer.json").symlink_to(folder.parent / "tokenizer.json")
    return "tokenizer", f"'{where}/tokenizer.json'"


def _tokenizer_folder_out(folder: Path) -> tuple[str, str]:
    where = read_manifest(folder)["tokenizer_dir"]
    (folder / where).rename(folder.parent / where)
    (folder / where).symlink_to(folder.parent / where)
    return "tokenizer", f"'{where}'"


@pytest.mark.parametrize("escape", [_absolute, _dotdot, _symlink_out, _tokenizer_file_out, _tokenizer_folder_out],
                         ids=["absolute", "dotdot", "symlink", "tokenizer-file-symlink", "tokenizer-folder-symlink"])
def test_paths_leaving_the_folder_are_refused_before_any_file_is_opened(folder, escape):
    graph, name = escape(folder)
    with pytest.raises(EnginesError, match=rf"^{graph}: .*{name}.*outside the engines folder"):
        load_engines(folder, device="cpu")
    assert not (folder / STAMPS).exists()  # no graph file was hashed, let alone given to ONNX Runtime


def test_a_subfolder_inside_the_build_is_served(folder):
    (folder / "build-0123456789ab").mkdir()
    (folder / "llm_decode.onnx").rename(folder / "build-0123456789ab" / "llm_decode.onnx")
    manifest = read_manifest(folder)
    manifest["graphs"]["llm_decode"]["files"]["fp32"]["file"] = "build-0123456789ab/llm_decode.onnx"
    write_manifest(folder, manifest)
    engines, _, _ = load_engines(folder, device="cpu", graphs=["llm_decode"])
    assert hows(engines)["llm_decode"] == ["sha256"]


# 3. + 4. the manifest is validated on load, limits included


def _set(path: str, value):
    def change(m: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            m = m[int(key)] if isinstance(m, list) else m[key]
        if value is _DELETE:
            del m[last]
        elif isinstance(m, list):
            m[int(last)] = value
        else:
            m[last] = value
    return change


_DELETE = object()

SCHEMA_CASES = [
    (_set("limits.max_seq", "x"), r'limits\.max_seq: expected a positive int, got "x"'),
    (_set("limits.max_batch", -1), r"limits\.max_batch: expected a positive int, got -1"),
    (_set("limits.max_batch", 32), r"limits\.max_batch: 32 exceeds what the graphs support: graphs\.\w+\.spec\.dims\.B\.max "
                                   r"is 16"),
    (_set("model.grid", _DELETE), r"model\.grid: missing"),
    (_set("model.grid", 0), r"model\.grid: expected a positive int, got 0"),
    (_set("model.grid", 9), r"model\.grid: 9 does not match graphs\.gen_encoder\.spec\.extra\.grid \(8\)"),
    (_set("model.latent_size", 12), r"model\.latent_size: 12 does not match graphs\.gen_encoder latents shape\[2\] \(16\)"),
    # The understanding side is the vision tower's own image_size (checked below); model.image_size is the
    # generated images' side, which the VAE decoder's graph fixes and the server answers `size` by.
    (_set("model.image_size", 384), r"model\.image_size: 384 does not match graphs\.vae_decoder images shape\[2\] "
                                    r"\(64\)"),
    (_set("model.config.vision_und_enc_config.params.image_size", 96),
     r"model\.config\.vision_und_enc_config\.params\.image_size: 96 does not match graphs\.vision_encoder pixel_values"),
    (_set("graphs.llm_decode.files", ["x"]), r"graphs\.llm_decode\.files: expected an object, got list"),
    (_set("graphs.llm_decode.files.fp32.sha256", "abc"), r"graphs\.llm_decode\.files\.fp32\.sha256: expected 64 lowercase"),
    (_set("graphs.vision_encoder.spec.extra", _DELETE), r"graphs\.vision_encoder\.spec\.extra: missing"),
    (_set("graphs.gen_decoder.spec.inputs.0.shape.2", -64),
     r"graphs\.gen_decoder\.spec\.inputs\[0\]\.shape\[2\]: expected a positive int or a dim name, got -64"),
    (_set("graphs.gen_decoder.spec.inputs.0.shape.1", "Q"),
     r"graphs\.gen_decoder\.spec\.inputs\[0\]\.shape\[1\]: expected a positive int or a sum of dims in \['B'\], got \"Q\""),
    (_set("graphs.llm_prefill.spec.dims.S", {"min": 5, "opt": 2, "max": 1}),
     r"graphs\.llm_prefill\.spec\.dims\.S: expected min <= opt <= max"),
    (_set("graphs.vae", {}), r"graphs\.vae: expected a graph of the contract \(vision_encoder, .*\), got \"vae\""),
    (_set("precisions", ["fp8"]), r"precisions\[0\]: expected one of fp32, fp16, bf16(, int8)?, got \"fp8\""),
    (_set("limits.max_seq", 4096), r"limits\.max_seq: 4096 exceeds what the model supports: "
                                   r"model\.config\.language_config\.max_position_embeddings is 1024"),
    (_set("model.image_size", 10**6), r"model\.image_size: 1000000 does not match graphs\.vae_decoder images "
                                      r"shape\[2\] \(64\)"),
    # Records a build writes in one shape (format 3): each is read whole, not only where the runtime looks.
    (_set("graphs.llm_decode.files.fp32.engine", {"file": "llm_decode.fp32.engine"}),
     r"graphs\.llm_decode\.files\.fp32\.engine\.sha256: missing"),
    (_set("backend.name", "cuda"), r"backend\.name: expected one of onnxruntime, tensorrt, got \"cuda\""),
    (_set("added", {"vae": ["fp16"]}), r"added\.vae: expected a graph of this build, got \"vae\""),
    (_set("versions.torch", 2), r"versions\.torch: expected a version string, got 2"),
    (_set("graphs.embed_tokens.files.fp32.size", _DELETE), r"graphs\.embed_tokens\.files\.fp32\.size: missing"),
]


@pytest.mark.parametrize("change,message", SCHEMA_CASES, ids=[f"case{i}" for i in range(len(SCHEMA_CASES))])
def test_an_invalid_manifest_is_refused_naming_the_key(folder, change, message):
    manifest = read_manifest(folder)
    change(manifest)
    write_manifest(folder, manifest)
    if message is None:
        load_engines(folder, device="cpu", graphs=["vision_encoder"])
        return
    with pytest.raises(EnginesError, match=rf"manifest\.json: {message}"):
        load_engines(folder, device="cpu")
    assert not (folder / STAMPS).exists()


def test_max_seq_beyond_the_graph_dims_is_refused_naming_both_numbers(folder):
    manifest = read_manifest(folder)
    manifest["model"]["config"]["language_config"]["max_position_embeddings"] = 8192
    manifest["limits"]["max_seq"] = 2048
    write_manifest(folder, manifest)
    with pytest.raises(EnginesError, match=r"limits\.max_seq: 2048 exceeds what the graphs support: "
                                           r"graphs\.embed_tokens\.spec\.dims\.S\.max is 1024"):
        load_engines(folder, device="cpu")


def test_what_is_not_a_file_or_folder_is_named_for_what_it_is(folder, tmp_path):
    """A path that exists but is the wrong kind of thing is not reported as missing."""
    from jfexport.core.processor.errors import ProcessorInputError
    from jfexport.core.processor.image import load_image

    (folder / "embed_tokens.onnx").unlink()
    (folder / "embed_tokens.onnx").mkdir()
    with pytest.raises(EnginesError, match=r"embed_tokens\.onnx: listed in the manifest for embed_tokens but not a "
                                           "regular file"):
        load_engines(folder, device="cpu")
    not_a_folder = tmp_path / "engines.txt"
    not_a_folder.write_text("x")
    with pytest.raises(EnginesError, match="engines folder is not a folder"):
        load_engines(not_a_folder, device="cpu")
    with pytest.raises(ProcessorInputError, match="not a regular file"):
        load_image(tmp_path)


# 5. graph subsets


def test_generation_and_understanding_open_only_their_graphs(folder):
    (folder / "vision_encoder.onnx").unlink()
    generation, _, _ = load_engines(folder, device="cpu", graphs=GENERATION_GRAPHS)
    assert set(generation) == set(GENERATION_GRAPHS) == set(generation.files) - {"tokenizer"}
    with pytest.raises(EnginesError, match=r"vision_encoder\.onnx: listed in the manifest for vision_encoder but missing"):
        load_engines(folder, device="cpu", graphs=UNDERSTANDING_GRAPHS)


def test_understanding_needs_no_vae_and_a_graph_the_build_lacks_is_named(folder):
    manifest = read_manifest(folder)
    del manifest["graphs"]["vae_decoder"]
    write_manifest(folder, manifest)
    understanding, _, _ = load_engines(folder, device="cpu", graphs=UNDERSTANDING_GRAPHS)
    assert set(understanding) == set(UNDERSTANDING_GRAPHS)
    with pytest.raises(EnginesError, match=r"no graph\(s\) \['vae_decoder'\] in this build"):
        load_engines(folder, device="cpu", graphs=GENERATION_GRAPHS)
    with pytest.raises(EnginesError, match=r"no graph\(s\) \['vae'\]"):
        load_engines(folder, device="cpu", graphs=["vae"])


# 6. verify holds the engines to the bounds of the precision the runtime chose


def test_verify_applies_the_bounds_of_the_precision_loaded(folder):
    manifest = Manifest.read(folder)
    assert pick_precision(manifest, None, "cuda") == "fp16" and pick_precision(manifest, None, "cpu") == "fp32"
    reference = ReferencePipeline(load_preset("tiny"))
    fp16 = verify(JanusFlowRuntime.from_engines(folder, precision="fp16", device="cpu"), reference, steps=2, new_tokens=2)
    by_name = {c.name: c for c in fp16}
    assert by_name["precision (as loaded)"].value == "fp16"
    assert by_name["image PSNR (dB)"].bound == ">= 30.0" and by_name["logits max abs"].bound == "<= 0.5"
    chosen = verify(JanusFlowRuntime.from_engines(folder, device="cpu"), reference, steps=2, new_tokens=2)
    by_name = {c.name: c for c in chosen}
    assert by_name["precision (as loaded)"].value == "fp32"  # pick_precision's choice for the CPU
    assert by_name["image PSNR (dB)"].bound == ">= 60.0" and by_name["latent max abs (2 steps)"].bound == "<= 0.001"


def test_verify_cli_reports_the_precision_it_checked(folder):
    res = run_cli("verify", "--engines", str(folder), "--precision", "fp16", "--steps", "2")
    assert "precision (as loaded)" in res.stdout and "fp16" in res.stdout, res.stdout + res.stderr
    assert ">= 30.0" in res.stdout


# 7. a GPU without onnxruntime's CUDA provider serves on the CPU, saying so once


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime has CUDA here")
def test_cuda_without_the_onnxruntime_provider_falls_back_to_the_cpu(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="jfexport.runtime.backends.ort_backend"):
        engines, manifest, _ = load_engines(folder, device="cuda")
    warnings = [r for r in caplog.records if "no CUDA provider" in r.getMessage()]
    assert len(warnings) == 1 and "running the engines on the CPU" in warnings[0].getMessage()
    assert engines.device == "cpu" and engines.precision == "fp32"  # fp16 only where it runs on a GPU
    feeds = min_feeds(manifest.graphs["embed_tokens"].spec.to_json())
    assert engines["embed_tokens"].run(feeds)["inputs_embeds"].device.type == "cpu"
    direct = OrtEngine("embed_tokens", folder / "embed_tokens.onnx", device="cuda")
    assert direct.device.type == "cpu" and direct.run(feeds)["inputs_embeds"].shape == (1, 1, 64)


# 6. the tokenizer folder the manifest names, and the `tokenizer` link readers of the fixed path open


@pytest.fixture
def linked(built, tmp_path) -> Path:
    """A copy that keeps `tokenizer` a link to the manifest's tokenizer folder, as the build made it."""
    copy = tmp_path / "linked"
    shutil.copytree(built, copy, symlinks=True)
    return copy


def test_the_tokenizer_folder_the_manifest_names_is_checked_once_through_its_link(linked):
    manifest = read_manifest(linked)
    where = manifest["tokenizer_dir"]
    assert os.readlink(linked / "tokenizer") == where
    engines, _, _ = load_engines(linked, device="cpu", graphs=["embed_tokens"])
    assert [c.file.name for c in engines.files["tokenizer"]] == [f"{where}/{n}" for n in manifest["tokenizer"]]
    assert engines.tokenizer == linked / where
    path = linked / "tokenizer" / "tokenizer.json"
    path.write_text(path.read_text() + " ")
    with pytest.raises(EnginesError, match=rf"tokenizer: .*{where}/tokenizer.json does not match the manifest"):
        load_engines(linked, device="cpu", graphs=["embed_tokens"])


def test_a_copy_that_turned_the_link_into_a_folder_is_served_from_the_manifests_folder(folder):
    assert not (folder / "tokenizer").is_symlink()  # shutil.copytree follows links: a folder of copies
    engines, manifest, _ = load_engines(folder, device="cpu", graphs=["embed_tokens"])
    assert engines.tokenizer == folder / manifest.tokenizer_dir
    assert {c.file.name.split("/")[0] for c in engines.files["tokenizer"]} == {manifest.tokenizer_dir}


def _stale_link(folder: Path) -> str:
    """What a build killed between its manifest replace and its link leaves: `tokenizer` at another build's."""
    where = read_manifest(folder)["tokenizer_dir"]
    stale = "tokenizer-0123456789ab"
    shutil.copytree(folder / where, folder / stale)
    (folder / stale / "tokenizer_config.json").write_text("{}")
    (folder / stale / "tokenizer.json").write_text("not the tokenizer")  # whoever reads it fails
    (folder / "tokenizer").unlink()
    (folder / "tokenizer").symlink_to(stale)
    return where


def test_a_link_left_at_the_previous_tokenizer_changes_nothing_the_runtime_serves(linked, tmp_path, monkeypatch):
    """The runtime reads the tokenizer the manifest names, so a build killed between its manifest
    replace and its link serves the new build whole, and opening the folder writes nothing to it
    (it may be read-only); the next build repoints the link."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    want = JanusFlowRuntime.from_engines(linked, tasks=("chat",)).processor.understanding_ids("What colour?")
    where = _stale_link(linked)
    _make_read_only(linked)
    try:
        runtime = JanusFlowRuntime.from_engines(linked, tasks=("chat",))
        assert runtime.processor.understanding_ids("What colour?") == want
        assert os.readlink(linked / "tokenizer") == "tokenizer-0123456789ab"  # left for the build to repoint
    finally:
        _make_writable(linked)
    (linked / "tokenizer").unlink()  # no link at all: the same
    assert JanusFlowRuntime.from_engines(linked, tasks=("chat",)).processor.understanding_ids("What colour?") == want
    assert where != "tokenizer-0123456789ab"


@pytest.mark.parametrize("value,message", [
    ("../elsewhere", r"tokenizer_dir: expected a folder name \(no '/' or '\.\.'\), got \"\.\./elsewhere\""),
    ("/etc", r"tokenizer_dir: expected a folder name"),
    (7, r"tokenizer_dir: expected a folder name"),
])
def test_a_tokenizer_dir_that_is_not_a_folder_name_is_refused(folder, value, message):
    manifest = read_manifest(folder)
    manifest["tokenizer_dir"] = value
    write_manifest(folder, manifest)
    with pytest.raises(EnginesError, match=rf"manifest\.json: {message}"):
        load_engines(folder, device="cpu")


def test_a_tokenizer_file_name_with_a_folder_is_refused(folder):
    manifest = read_manifest(folder)
    manifest["tokenizer"]["../../etc/passwd"] = "0" * 64
    write_manifest(folder, manifest)
    with pytest.raises(EnginesError, match=r"manifest\.json: tokenizer\.\.\./\.\./etc/passwd: expected a file name"):
        load_engines(folder, device="cpu")


# 8. the typed manifest: one reader, one writer, one format


def test_the_typed_manifest_reads_and_writes_a_real_build_unchanged(folder, tmp_path):
    data = read_manifest(folder)
    manifest = Manifest.from_json(data)
    assert manifest.to_json() == data
    assert manifest.graphs["llm_decode"].spec.extra["layers"] == 2 and manifest.limits == Limits(16, 1024)
    (tmp_path / "again").mkdir()
    manifest.write(tmp_path / "again")
    assert read_manifest(tmp_path / "again") == data
    assert [p.name for p in (tmp_path / "again").iterdir()] == ["manifest.json"]  # no temporary file left


@pytest.mark.parametrize("found", ["jfexport-manifest/2", "jfexport-manifest/1", None])
def test_an_older_format_is_refused_naming_the_format_and_the_fix(folder, found):
    manifest = read_manifest(folder)
    manifest["format"] = found
    write_manifest(folder, manifest)
    with pytest.raises(EnginesError, match=rf"manifest\.json: format {re.escape(repr(found))}, this runtime reads "
                                           rf"'jfexport-manifest/3'.*: rebuild the engines \(`jfexport build --out "
                                           rf"{re.escape(str(folder))}`\)"):
        load_engines(folder, device="cpu")
    assert not (folder / STAMPS).exists()
