"""Official checkpoint layout: loading, saving, sharding and the errors users see."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from jfexport.reference.checkpoint import load_checkpoint, save_checkpoint
from jfexport.reference.modules.siglip import UNUSED_PREFIX
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from jfexport.core.errors import CheckpointError, ConfigError

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


@pytest.fixture(scope="module")
def tiny_official_dir(tiny_bundle, tmp_path_factory):
    """The tiny preset written by the project's writer (bf16, official names), plus a SigLIP
    attention-pool tensor as the official release carries: the same layout as official-A."""
    folder = tmp_path_factory.mktemp("tiny") / "checkpoint"
    save_checkpoint(tiny_bundle.model, folder)
    state = load_file(str(folder / "model.safetensors"))
    state[UNUSED_PREFIX + "latent"] = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(params=["tiny", "official-A"])
def checkpoint(request):
    """(folder, its loaded model): the tiny preset always; official-A when the golden fixtures exist."""
    if request.param == "tiny":
        folder = request.getfixturevalue("tiny_official_dir")
        return folder, load_checkpoint(folder)
    return request.getfixturevalue("official_a_dir"), request.getfixturevalue("official_a_model")


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_save_round_trip_is_bit_exact(checkpoint, tmp_path):
    folder, model = checkpoint
    out = tmp_path / "saved"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier save")  # replaced whole, not merged into
    save_checkpoint(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    written = load_file(str(out / "model.safetensors"))
    _assert_same_tensors(load_file(str(folder / "model.safetensors")), written)  # attention-pool tensors included
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    _assert_same_tensors(model.state_dict(), load_checkpoint(out).state_dict())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_preset_reloads_tensor_for_tensor(tiny_bundle, tmp_path, dtype):
    save_checkpoint(tiny_bundle.model, tmp_path / "c", dtype=dtype)
    reloaded = load_checkpoint(tmp_path / "c")
    assert reloaded.config.to_dict() == tiny_bundle.model.config.to_dict()
    # Loading upcasts to fp32 exactly: a bf16 save equals the weights rounded to bf16.
    expected = {k: v.to(dtype).float() for k, v in tiny_bundle.model.state_dict().items()}
    _assert_same_tensors(expected, reloaded.state_dict())


def test_attention_pool_is_skipped_with_one_log_line(checkpoint, caplog):
    folder, _ = checkpoint
    with caplog.at_level(logging.INFO, logger="jfexport.reference.checkpoint"):
        model = load_checkpoint(folder)
    lines = [r.getMessage() for r in caplog.records if "attn_pool" in r.getMessage()]
    assert len(lines) == 1 and "skipping" in lines[0]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        pool = {k for k in f.keys() if k.startswith(UNUSED_PREFIX)}
    assert pool and set(model.unused_tensors) == pool


def _shard(folder, out, parts: int = 3) -> dict[str, list[str]]:
    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    shards = {f"model-{i + 1:05d}-of-{parts:05d}.safetensors": keys[i::parts] for i in range(parts)}
    out.mkdir()
    shutil.copy(folder / "config.json", out)
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(out / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return shards


def test_sharded_checkpoint_loads(checkpoint, tmp_path):
    folder, model = checkpoint
    _shard(folder, tmp_path / "sharded")
    sharded = load_checkpoint(tmp_path / "sharded")
    _assert_same_tensors(model.state_dict(), sharded.state_dict())
    assert set(sharded.unused_tensors) == set(model.unused_tensors)


def test_index_naming_a_missing_shard_is_named(tiny_official_dir, tmp_path):
    shards = _shard(tiny_official_dir, tmp_path / "sharded")
    gone = sorted(shards)[1]
    (tmp_path / "sharded" / gone).unlink()
    with pytest.raises(CheckpointError, match=f"names shard.*{gone}"):
        load_checkpoint(tmp_path / "sharded")


def test_broken_index_and_corrupt_shard_are_named(tiny_official_dir, tmp_path):
    shards = _shard(tiny_official_dir, tmp_path / "sharded")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a safetensors index"):
        load_checkpoint(tmp_path / "sharded")
    index.write_text(good)
    corrupt = tmp_path / "sharded" / sorted(shards)[0]
    corrupt.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=f"{corrupt.name}: cannot read safetensors"):
        load_checkpoint(tmp_path / "sharded")


def test_missing_key_is_named(checkpoint, tmp_path):
    key = "vision_gen_dec_model.out_convs.0.unpatch_conv.bias"
    folder = _copy(checkpoint[0], tmp_path / "c", drop=[key])
    with pytest.raises(CheckpointError, match="missing keys.*" + key.replace(".", r"\.")):
        load_checkpoint(folder)


def test_missing_tower_key_is_named_in_official_form(checkpoint, tmp_path):
    key = "vision_und_enc_model.vision_tower.blocks.0.attn.qkv.weight"
    folder = _copy(checkpoint[0], tmp_path / "c", drop=[key])
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_checkpoint(folder)


def test_unexpected_key_is_named(checkpoint, tmp_path):
    folder = _copy(checkpoint[0], tmp_path / "c", add={"repa_mlp.0.weight": torch.zeros(2, 2, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=r"unexpected keys repa_mlp\.0\.weight"):
        load_checkpoint(folder)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    key = "vision_gen_enc_aligner.bias"
    folder = _copy(checkpoint[0], tmp_path / "c", change={key: torch.zeros(7, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=r"vision_gen_enc_aligner\.bias: checkpoint \(7,\)"):
        load_checkpoint(folder)


def test_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_checkpoint(tmp_path)


def test_config_of_another_model_type(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        load_checkpoint(folder)


def test_cli_errors_name_the_culprit(tmp_path):
    res = run_cli("generate", "x", "--checkpoint", str(tmp_path / "nope"))
    assert res.returncode != 0 and "nope" in res.stderr and "does not exist" in res.stderr
    res = run_cli("generate", "x", "--preset", "huge")
    assert res.returncode == 2 and "--preset" in res.stderr and "'huge' is not one of 'tiny'" in res.stderr
