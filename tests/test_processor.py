"""Tokenizer mutation, templates, batch layouts and image preprocessing of the processor."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jfexport.reference.bundle import TINY_ASSETS
from jfexport.reference.errors import InputError
from jfexport.reference.processor import (
    JanusProcessor, load_image, load_tokenizer, preprocess_image, understanding_prompt, generation_prompt,
)
from jfexport.reference.processor.make_tiny_tokenizer import build

N = 16


@pytest.fixture(scope="module")
def processor():
    return JanusProcessor.from_folder(TINY_ASSETS, image_size=64, num_image_tokens=N)


def test_shipped_tiny_tokenizer_is_what_the_script_builds(tmp_path):
    build(tmp_path)
    for f in TINY_ASSETS.iterdir():
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def test_special_ids_are_distinct_and_bos_is_prepended(processor):
    tok = processor.tokenizer
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id, tok.image_start_id, tok.image_end_id, tok.image_gen_id]
    assert len(set(ids)) == 7
    encoded = tok.encode("a red circle at the top left")
    assert encoded[0] == tok.bos_id
    assert tok.decode(encoded) == "a red circle at the top left"


def test_missing_tags_are_added_like_the_official_processor(tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(TINY_ASSETS, folder)
    cfg = json.loads((folder / "processor_config.json").read_text())
    cfg["image_start_tag"] = "<image_beg>"
    (folder / "processor_config.json").write_text(json.dumps(cfg))
    before = len(load_tokenizer(TINY_ASSETS))
    tok = load_tokenizer(folder)
    assert tok.image_start_id == before and len(tok) == before + 1
    assert tok.encode("x<image_beg>")[-1] == tok.image_start_id


def test_pad_falls_back_to_eos_without_a_pad_token(tmp_path):
    raw = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hello": 2, "[UNK]": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_id == tok.eos_id == 1
    # Every tag was missing: appended in the official order image, generation, BOI, EOI.
    assert [tok.image_id, tok.image_gen_id, tok.image_start_id, tok.image_end_id] == [4, 5, 6, 7]


def test_templates_are_exact():
    assert generation_prompt("  a cat ") == "User: a cat\n\nAssistant:"
    text = understanding_prompt("What is it?")
    assert text.startswith("You are a helpful language and vision assistant. You are able to understand")
    assert text.endswith("natural language.\n\nUser: <image_placeholder>\nWhat is it?\n\nAssistant:")
    with pytest.raises(InputError, match="empty"):
        generation_prompt("  ")


def test_understanding_batch_layout(processor):
    tok = processor.tokenizer
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    batch = processor.understanding_batch(["What colour is the shape?", "Where?"], [img, img])
    long, short = batch.input_ids
    n_pad = int((batch.attention_mask[1] == 0).sum())
    assert n_pad > 0 and (short[:n_pad] == tok.pad_id).all() and short[n_pad] == tok.bos_id
    for row, mask in zip(batch.input_ids, batch.images_seq_mask):
        boi = int((row == tok.image_start_id).nonzero()[0])
        assert (row[boi + 1 : boi + 1 + N] == tok.image_id).all() and row[boi + 1 + N] == tok.image_end_id
        assert mask.sum() == N + 1 and mask[boi] and not mask[boi + 1 + N]
    assert batch.pixel_values.shape == (2, 1, 3, 64, 64) and batch.images_emb_mask.shape == (2, 1, N + 1)


def test_generation_tokens_end_with_the_tag_and_pad_left(processor):
    tok = processor.tokenizer
    batch = processor.generation_tokens(["a red circle at the top left", "a star"])
    assert (batch.input_ids[:, -1] == tok.image_start_id).all()
    assert batch.input_ids[0, 0] == tok.bos_id and batch.attention_mask[1, 0] == 0


@pytest.mark.parametrize("size", [(80, 40), (40, 80), (50, 50)])
def test_preprocess_shapes_and_background(size):
    img = Image.new("RGB", size, (255, 255, 255))
    x = preprocess_image(img, 64)
    assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1
    bg = (127 / 255 - 0.5) / 0.5
    w, h = size
    if w > h:  # landscape: 64x32 content centred vertically, rows above are background
        assert torch.allclose(x[:, 0], torch.full((3, 64), bg)) and torch.allclose(x[:, 32], torch.ones(3, 64))
    elif h > w:
        assert torch.allclose(x[:, :, 0], torch.full((3, 64), bg))
    else:
        assert torch.allclose(x, torch.ones_like(x))


def test_preprocess_matches_a_hand_computation():
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[0, 0] = (10, 200, 30)
    x = preprocess_image(Image.fromarray(arr), 64)  # same size: the bicubic resize is the identity
    assert torch.allclose(x[:, 0, 0], (torch.tensor([10, 200, 30]) / 255 - 0.5) / 0.5)


def test_grey_and_rgba_images_are_converted():
    assert preprocess_image(Image.new("L", (30, 20), 200), 64).shape == (3, 64, 64)
    assert preprocess_image(Image.new("RGBA", (20, 30), (1, 2, 3, 4)), 64).shape == (3, 64, 64)


def test_non_image_file_is_named(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="notes.png"):
        load_image(bad)
