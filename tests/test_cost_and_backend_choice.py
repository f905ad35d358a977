"""Cost model arithmetic and the backend choice (no TensorRT on these machines)."""

from __future__ import annotations

import pytest
from jfexport.runtime.backend_choice import choose_backend, tensorrt_available
from jfexport.runtime.errors import BackendUnavailable

from jfexport.core.config import JanusFlowConfig
from jfexport.core.presets import preset_config
from jfexport.tools.cost_model import _llm_params, generation_cost, llm_cost

FULL = JanusFlowConfig.from_dict(preset_config("janusflow-1.3b"))


def test_llm_parameter_count_matches_the_release():
    blocks, head = _llm_params(FULL)
    embed = FULL.language.vocab_size * FULL.language.hidden_size
    total = blocks + head + embed + FULL.language.num_hidden_layers * 2 * FULL.language.hidden_size
    assert abs(total / 1e6 - 1652.7) < 1.0  # JANUSFLOW.md 2.8


def test_prompt_cache_saves_the_prompt_work_of_every_step():
    cached = generation_cost(FULL, 1, 40, 30, 48, 2, recompute=False)
    full = generation_cost(FULL, 1, 40, 30, 48, 2, recompute=True)
    saved = full["llm_decode"].flops - cached["llm_decode"].flops
    assert saved > 29 * cached["llm_prefill"].flops


def test_decode_bytes_grow_with_the_past():
    assert llm_cost(FULL, 1, 1, 1000, 2, True).bytes > llm_cost(FULL, 1, 1, 10, 2, True).bytes


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_without_tensorrt_auto_falls_back_and_explicit_request_says_how_to_install():
    choice = choose_backend("auto")
    assert choice.backend == "onnxruntime" and "TensorRT is not installed" in choice.reason
    with pytest.raises(BackendUnavailable, match="pypi.nvidia.com"):
        choose_backend("tensorrt")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        choose_backend("openvino")
