"""ONNX export of the seven graphs: ONNX Runtime parity at many shapes, fp16 islands, TensorRT ops."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from jfexport.export.trt_ops import check_file, check_model
from jfexport.export.validate import compare, reference_cases
from jfexport.reference.bundle import load_preset
from jfexport.reference.graphs import GRAPH_NAMES, build_graph

from jfexport.core.graph_spec import GraphSpec

from .conftest import run_cli


@pytest.fixture(scope="module")
def fresh_tiny():
    """An fp32 tiny model for references (the session export converted its own copy to fp16)."""
    bundle = load_preset("tiny")
    from jfexport.export.precision import use_explicit_softmax

    use_explicit_softmax(bundle.model)
    return bundle


def _spec(manifest: dict, name: str, bundle) -> GraphSpec:
    spec = bundle.graph_specs()[name]
    assert spec.to_json() == manifest["graphs"][name]["spec"]  # the manifest carries the spec verbatim
    return spec


def _shapes(spec: GraphSpec) -> list[dict[str, int]]:
    """Four shapes besides the export sample, with 1s, past length 0 and odd sizes."""
    dims = spec.dims
    out = []
    for b, s, t, p in ((1, 1, 1, 0), (2, 3, 1, 9), (4, 17, dims["T"].max if "T" in dims else 1, 2), (5, 2, 2, 1)):
        values = {"B": b, "S": s, "T": t, "P": p}
        out.append({k: v for k, v in values.items() if k in dims})
    return out


def test_manifest_lists_all_graphs_with_hashes(tiny_export):
    out, manifest = tiny_export
    assert set(manifest["graphs"]) == set(GRAPH_NAMES)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for name, entry in manifest["graphs"].items():
        precisions = {"fp32"} if name == "vae_decoder" else {"fp32", "fp16"}
        assert set(entry["files"]) == precisions
        for info in entry["files"].values():
            assert (out / info["file"]).is_file() and len(info["sha256"]) == 64 and info["parity"]["ok"]
    # No staging left behind; the lock file stays (removing a flock'd file races with the next locker).
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".jfexport.lock"]


def test_an_export_manifest_has_a_builds_limits_and_reads_back(tiny_export):
    """Its limits are a build's (max_seq within the model's positions), so the manifest reader accepts it."""
    from jfexport.export.exporter import build_limits
    from jfexport.reference.bundle import load_preset

    from jfexport.core.manifest import Manifest

    out, manifest = tiny_export
    assert Manifest.read(out).limits == build_limits(load_preset("tiny"))


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_fp32_parity_at_other_shapes(tiny_export, fresh_tiny, name):
    out, manifest = tiny_export
    spec = _spec(manifest, name, fresh_tiny)
    cases = reference_cases(build_graph(name, fresh_tiny.model, fresh_tiny.vae), spec, _shapes(spec))
    parity = compare(out / manifest["graphs"][name]["files"]["fp32"]["file"], spec, "fp32", cases)
    assert parity.ok, parity


@pytest.mark.parametrize("name", [g for g in GRAPH_NAMES if g != "vae_decoder"])
def test_fp16_parity_against_the_fp32_reference(tiny_export, fresh_tiny, name):
    out, manifest = tiny_export
    spec = _spec(manifest, name, fresh_tiny)
    cases = reference_cases(build_graph(name, fresh_tiny.model, fresh_tiny.vae), spec, _shapes(spec)[:2])
    parity = compare(out / manifest["graphs"][name]["files"]["fp16"]["file"], spec, "fp16", cases)
    assert parity.ok and parity.max_rel <= 1e-2, parity


def _input_types(path, op: str) -> set[int]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    return {types.get(n.input[0]) for n in model.graph.node if n.op_type == op}


@pytest.mark.parametrize("graph,op", [
    ("llm_decode", "Softmax"), ("vision_encoder", "Softmax"), ("vision_encoder", "LayerNormalization"),
    ("gen_encoder", "ReduceL2"), ("gen_decoder", "ReduceL2"), ("gen_encoder", "Sin"), ("llm_prefill", "ReduceMean"),
])
def test_fp16_graphs_keep_fp32_islands(tiny_export, graph, op):
    out, manifest = tiny_export
    types = _input_types(out / manifest["graphs"][graph]["files"]["fp16"]["file"], op)
    assert types == {onnx.TensorProto.FLOAT}, types


def test_pixel_shuffle_is_depth_to_space_crd_and_all_ops_pass(tiny_export):
    out, manifest = tiny_export
    model = onnx.load(str(out / manifest["graphs"]["gen_decoder"]["files"]["fp32"]["file"]))
    d2s = [n for n in model.graph.node if n.op_type == "DepthToSpace"]
    assert d2s and all(a.s == b"CRD" for n in d2s for a in n.attribute if a.name == "mode")
    for name, entry in manifest["graphs"].items():
        for info in entry["files"].values():
            assert check_file(out / info["file"]) == [], (name, info["file"])


def test_operator_check_names_the_offending_node():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("DepthToSpace", ["x"], ["y"], name="shuffle", blocksize=2, mode="DCR"),
         onnx.helper.make_node("StringNormalizer", ["s"], ["t"], name="strings")],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 2, 2]),
              onnx.helper.make_tensor_value_info("s", onnx.TensorProto.STRING, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 4, 4]),
         onnx.helper.make_tensor_value_info("t", onnx.TensorProto.STRING, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    findings = {f.node: f.problem for f in check_model(model)}
    assert "CRD" in findings["shuffle"] and "not supported" in findings["strings"]


def test_export_cli_errors(tmp_path):
    res = run_cli("export", "--out", str(tmp_path / "o"), "--graphs", "llm_prefil")
    assert res.returncode != 0 and "llm_prefil" in res.stderr
    res = run_cli("export", "--out", str(tmp_path / "o"), "--graphs", "vae_decoder", "--fp16")
    assert res.returncode != 0 and "fp16" in res.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run_cli("export", "--out", str(blocker / "sub"), "--graphs", "embed_tokens")
    assert res.returncode != 0 and "not writable" in res.stderr


def test_export_cli_writes_a_subset(tmp_path):
    res = run_cli("export", "--out", str(tmp_path), "--graphs", "embed_tokens,gen_encoder")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"embed_tokens", "gen_encoder"}


def test_padded_positions_are_left_out_of_llm_comparisons():
    from jfexport.export.samples import meaningful

    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    feeds = {"attention_mask": mask, "inputs_embeds": torch.zeros(2, 3, 4)}
    present = torch.arange(2 * 2 * 3 * 1).float().view(2, 2, 3, 1)
    kept = meaningful("present.0.key", present, feeds)
    assert kept.shape == (5, 2, 1)  # 3 + 2 unpadded positions, both heads
    assert meaningful("hidden_states", torch.zeros(2, 1, 4), feeds).shape == (2, 4)  # decode: last position only
    assert meaningful("logits", torch.zeros(2, 7), feeds).shape == (2, 7)
