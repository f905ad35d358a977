"""The onnxruntime engine on CPU: dtype casting of feeds, missing inputs, unreadable files."""

from __future__ import annotations

import onnx
import pytest
import torch
from jfexport.runtime.backends.ort_backend import OrtEngine
from jfexport.runtime.errors import RuntimeFailure
from onnx import TensorProto, helper


@pytest.fixture(scope="module")
def scale_model(tmp_path_factory):
    """y = x * 2 (fp16) and ids passed through, with a dynamic batch dim."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"]), helper.make_node("Identity", ["ids"], ["ids_out"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["B", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["B", 3]),
         helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["B"])],
        [helper.make_tensor("two", TensorProto.FLOAT16, [], [2.0])],
    )
    path = tmp_path_factory.mktemp("onnx") / "scale.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_feeds_are_cast_to_the_declared_dtype(scale_model):
    engine = OrtEngine("scale", scale_model)
    out = engine.run({"x": torch.ones(2, 3), "ids": torch.tensor([4, 5], dtype=torch.int32)})
    assert out["y"].dtype == torch.float16 and torch.equal(out["y"].float(), torch.full((2, 3), 2.0))
    assert out["ids_out"].tolist() == [4, 5]


def test_missing_input_is_named(scale_model):
    with pytest.raises(RuntimeFailure, match=r"scale: missing input\(s\) \['ids'\]"):
        OrtEngine("scale", scale_model).run({"x": torch.ones(1, 3)})


def test_unreadable_graph_is_named(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(RuntimeFailure, match="broken.onnx"):
        OrtEngine("broken", bad)
