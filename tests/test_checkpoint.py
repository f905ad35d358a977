"""Official checkpoint layout: loading, saving, sharding and the errors users see."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from jfexport.reference.checkpoint import load_checkpoint, save_checkpoint
from jfexport.reference.errors import CheckpointError, ConfigError

from .conftest import run_cli


def _copy(src, dst, drop=(), change=None, add=None):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(str(src / "model.safetensors"))
    for k in drop:
        del state[k]
    for k, v in (change or {}).items():
        state[k] = v
    state.update(add or {})
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_save_round_trip_is_bit_exact(official_a_dir, official_a_model, tmp_path):
    out = tmp_path / "saved"
    save_checkpoint(official_a_model, out)
    with safe_open(str(official_a_dir / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())  # attention-pool tensors included
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype == torch.bfloat16 and torch.equal(x, y), k
    assert json.loads((out / "config.json").read_text()) == json.loads((official_a_dir / "config.json").read_text())
    reloaded = load_checkpoint(out)
    for (k, p), (_, q) in zip(official_a_model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(p, q), k
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_attention_pool_is_skipped_with_one_log_line(official_a_dir, caplog):
    with caplog.at_level(logging.INFO, logger="jfexport.reference.checkpoint"):
        load_checkpoint(official_a_dir)
    lines = [r.getMessage() for r in caplog.records if "attn_pool" in r.getMessage()]
    assert len(lines) == 1 and "skipping" in lines[0]


def test_sharded_checkpoint_loads(official_a_dir, official_a_model, tmp_path):
    state = load_file(str(official_a_dir / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(official_a_dir / "config.json", folder)
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_checkpoint(folder)
    assert torch.equal(model.beg_of_und_embed, official_a_model.beg_of_und_embed)


def test_missing_key_is_named(official_a_dir, tmp_path):
    key = "vision_gen_dec_model.out_convs.0.unpatch_conv.bias"
    folder = _copy(official_a_dir, tmp_path / "c", drop=[key])
    with pytest.raises(CheckpointError, match="missing keys.*" + key.replace(".", r"\.")):
        load_checkpoint(folder)


def test_missing_tower_key_is_named_in_official_form(official_a_dir, tmp_path):
    key = "vision_und_enc_model.vision_tower.blocks.0.attn.qkv.weight"
    folder = _copy(official_a_dir, tmp_path / "c", drop=[key])
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_checkpoint(folder)


def test_unexpected_key_is_named(official_a_dir, tmp_path):
    folder = _copy(official_a_dir, tmp_path / "c", add={"repa_mlp.0.weight": torch.zeros(2, 2, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=r"unexpected keys repa_mlp\.0\.weight"):
        load_checkpoint(folder)


def test_wrong_shape_is_named(official_a_dir, tmp_path):
    key = "vision_gen_enc_aligner.bias"
    folder = _copy(official_a_dir, tmp_path / "c", change={key: torch.zeros(7, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=r"vision_gen_enc_aligner\.bias: checkpoint \(7,\)"):
        load_checkpoint(folder)


def test_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_checkpoint(tmp_path)


def test_config_of_another_model_type(official_a_dir, tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        load_checkpoint(folder)


def test_cli_errors_name_the_culprit(tmp_path):
    res = run_cli("generate", "x", "--checkpoint", str(tmp_path / "nope"))
    assert res.returncode != 0 and "nope" in res.stderr and "does not exist" in res.stderr
    res = run_cli("generate", "x", "--preset", "huge")
    assert res.returncode != 0 and "unknown preset 'huge'" in res.stderr
