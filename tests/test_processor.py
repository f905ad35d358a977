"""Tokenizer mutation, templates, batch layouts and image preprocessing of the processor."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from jfexport.reference.bundle import TINY_ASSETS
from jfexport.reference.make_tiny_tokenizer import build
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.image_transforms import normalize, rescale

from jfexport.core.errors import CheckpointError, InputError
from jfexport.core.processor import (
    SYSTEM_PROMPT,
    JanusProcessor,
    generation_prompt,
    load_image,
    load_tokenizer,
    preprocess_image,
    understanding_prompt,
)

N = 16
S = 64


def _norm(levels, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """Hand normalisation of 8-bit levels in float32, the arithmetic of the official processor."""
    return (torch.tensor(levels, dtype=torch.float32) / 255 - mean) / std


BG = _norm(127)  # the background colour int(0.5 * 255) after normalisation


@pytest.fixture(scope="module")
def processor():
    return JanusProcessor.from_folder(TINY_ASSETS, image_size=S, num_image_tokens=N)


def test_shipped_tiny_tokenizer_is_what_the_script_builds(tmp_path):
    build(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in TINY_ASSETS.iterdir())
    for f in TINY_ASSETS.iterdir():
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def test_special_ids_are_distinct_and_bos_is_prepended(processor):
    tok = processor.tokenizer
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id, tok.image_start_id, tok.image_end_id, tok.image_gen_id]
    assert len(set(ids)) == 7 and max(ids) < len(tok) <= 1000
    for text in ["a red circle at the top left", "How many stars? Nine, or 9!", "unseen wörds 和 emoji 🙂"]:
        encoded = tok.encode(text)
        assert encoded[0] == tok.bos_id and encoded.count(tok.bos_id) == 1
        assert tok.decode(encoded) == text
    assert tok.decode(tok.encode("a<image_placeholder>b"), skip_special_tokens=False).endswith("a<image_placeholder>b")


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
    # An explicit config overrides the folder's processor_config.json.
    assert load_tokenizer(folder, {}).image_start_id == load_tokenizer(TINY_ASSETS).image_start_id


def test_pad_falls_back_to_eos_without_a_pad_token(tmp_path):
    raw = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hello": 2, "[UNK]": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_id == tok.eos_id == 1
    # Every tag was missing: appended in the official order image, generation, BOI, EOI.
    assert [tok.image_id, tok.image_gen_id, tok.image_start_id, tok.image_end_id] == [4, 5, 6, 7]
    # This tokenizer has no BOS post-processor: encode still starts with BOS.
    assert tok.encode("hello") == [0, 2]


def test_folder_without_tokenizer_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}.*tokenizer.json") as e:
        load_tokenizer(tmp_path)
    assert isinstance(e.value, CheckpointError)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer.json: cannot load"):
        load_tokenizer(tmp_path)


def test_templates_are_exact():
    assert generation_prompt("  a cat ") == "User: a cat\n\nAssistant:"
    assert understanding_prompt("What is it?") == (
        "You are a helpful language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language.\n\n"
        "User: <image_placeholder>\nWhat is it?\n\nAssistant:"
    )
    assert understanding_prompt("What is it?") == f"{SYSTEM_PROMPT}\n\nUser: <image_placeholder>\nWhat is it?\n\nAssistant:"
    # The official template strips the whole user message: leading spaces of the question stay.
    assert understanding_prompt(" Why? \n", system_prompt="", image_tag="<img>") == "User: <img>\n Why?\n\nAssistant:"


@pytest.mark.parametrize("make", [lambda: generation_prompt(" \n"), lambda: understanding_prompt("")])
def test_empty_prompt_is_refused(make):
    with pytest.raises(ValueError, match="empty prompt") as e:
        make()
    assert isinstance(e.value, InputError)


def test_understanding_batch_layout(processor):
    tok = processor.tokenizer
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    questions = ["What colour is the shape in the top left corner?", "Where?"]
    batch = processor.understanding_batch(questions, [img, img])
    T = batch.input_ids.shape[1]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.int64
    assert batch.images_seq_mask.dtype == batch.images_emb_mask.dtype == torch.bool
    assert batch.pixel_values.shape == (2, 1, 3, S, S) and batch.pixel_values.dtype == torch.float32
    assert batch.images_emb_mask.shape == (2, 1, N + 1) and batch.images_emb_mask.all()
    for q, row, mask, seq_mask in zip(questions, batch.input_ids, batch.attention_mask, batch.images_seq_mask):
        text = tok.encode(understanding_prompt(q))
        at = text.index(tok.image_id)
        expected = text[:at] + [tok.image_start_id] + [tok.image_id] * N + [tok.image_end_id] + text[at + 1:]
        pad = T - len(expected)
        assert row.tolist() == [tok.pad_id] * pad + expected
        assert mask.tolist() == [0] * pad + [1] * len(expected)
        boi = pad + at
        assert seq_mask.nonzero().flatten().tolist() == list(range(boi, boi + N + 1))
        assert row[boi + N + 1] == tok.image_end_id
    assert (batch.attention_mask[1] == 0).sum() > 0 and batch.attention_mask[0].all()


def test_question_holding_the_image_tag_is_refused_in_official_mode():
    # The default (safe) mode reads the tag as plain text: tests/test_input_safety.py.
    official = JanusProcessor.from_folder(TINY_ASSETS, image_size=S, num_image_tokens=N, official_special_text=True)
    with pytest.raises(ValueError, match="image tag"):
        official.understanding_batch(["<image_placeholder> again?"], [Image.new("RGB", (8, 8))])


def test_generation_tokens_end_with_the_tag_and_pad_left(processor):
    tok = processor.tokenizer
    prompts = ["a small red circle on a blue background", "a star"]
    batch = processor.generation_tokens(prompts)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.int64
    L = batch.input_ids.shape[1]
    for p, row, mask in zip(prompts, batch.input_ids, batch.attention_mask):
        expected = tok.encode(generation_prompt(p) + "<begin_of_image>")
        assert expected[0] == tok.bos_id and expected[-1] == tok.image_start_id
        assert expected.count(tok.image_start_id) == 1
        pad = L - len(expected)
        assert row.tolist() == [tok.pad_id] * pad + expected
        assert mask.tolist() == [0] * pad + [1] * len(expected)
    assert batch.attention_mask[0].all() and not batch.attention_mask[1, 0]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize(
    "size, content",  # (W, H) -> the resized content box (x0, y0, w, h) inside the S x S square
    [
        ((128, 50), (0, 19, 64, 25)),  # landscape: h = int(50/128*64) = 25, pasted at (64-25)//2 = 19
        ((50, 128), (19, 0, 25, 64)),  # portrait
        ((640, 10), (0, 25, 64, 14)),  # h = int(1.0) = 1 is raised to min_size 14
        ((30, 30), (0, 0, 64, 64)),  # square: resized only
    ],
)
def test_preprocess_layout_and_background(mode, size, content):
    colour = {"RGB": (255, 255, 255), "RGBA": (255, 255, 255, 0), "L": 255}[mode]
    x = preprocess_image(Image.new(mode, size, colour), S)
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    x0, y0, w, h = content
    inside = torch.zeros(S, S, dtype=torch.bool)
    inside[y0 : y0 + h, x0 : x0 + w] = True
    # A uniform image stays uniform through the bicubic resize (RGBA drops alpha, as convert("RGB")).
    assert torch.equal(x[:, inside], torch.ones(3, int(inside.sum())))
    assert torch.equal(x[:, ~inside], BG.expand(3, int((~inside).sum())))


def test_preprocess_matches_a_hand_computation():
    arr = np.zeros((S, S, 3), dtype=np.uint8)
    arr[0, 0] = (10, 200, 30)
    x = preprocess_image(Image.fromarray(arr), S)  # already S x S: the bicubic resize is the identity
    assert torch.equal(x[:, 0, 0], _norm([10, 200, 30]))
    # Landscape 2S x S, uniform colour: content starts at row (S - S/2) // 2 = 16, background above.
    x = preprocess_image(Image.new("RGB", (2 * S, S), (10, 200, 30)), S)
    assert torch.equal(x[:, 16, 0], _norm([10, 200, 30]))
    assert torch.equal(x[:, 15, 0], BG.expand(3))


def test_preprocess_normalisation_is_bitwise_that_of_transformers():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    chw = arr.transpose(2, 0, 1)
    ref = normalize(rescale(chw, 1 / 255, input_data_format="channels_first"), mean, std, input_data_format="channels_first")
    x = preprocess_image(Image.fromarray(arr), S, mean, std)
    assert np.array_equal(x.numpy(), ref)
    unnormalised = preprocess_image(Image.fromarray(arr), S, mean, std, normalize=False)
    assert np.array_equal(unnormalised.numpy(), rescale(chw, 1 / 255, input_data_format="channels_first"))


def test_from_folder_reads_the_preprocessor_config(tmp_path):
    shutil.copytree(TINY_ASSETS, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg.update(image_mean=[0.25, 0.25, 0.25], image_std=[0.5, 0.5, 0.5], min_size=20, background_color=[1, 2, 3])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    proc = JanusProcessor.from_folder(tmp_path, image_size=S, num_image_tokens=N)
    pixels = proc.understanding_batch(["What?"], [Image.new("RGB", (640, 10), (255, 255, 255))]).pixel_values[0, 0]
    # background_color is ignored, as officially: int(0.25 * 255) = 63; content rows (64-20)//2 = 22 onwards.
    assert torch.equal(pixels[:, 21, 0], _norm(63, mean=0.25).expand(3))
    assert torch.equal(pixels[:, 22, 0], _norm(255, mean=0.25).expand(3))
    assert torch.equal(pixels[:, 42, 0], pixels[:, 21, 0])


@pytest.mark.parametrize("key, value", [("image_mean", [0.5, 0.5]), ("image_std", 0.5), ("image_mean", [0.1, 0.2, 0.3, 0.4])])
def test_preprocessor_config_needs_one_value_per_channel(tmp_path, key, value):
    shutil.copytree(TINY_ASSETS, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg[key] = value
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"preprocessor_config.json: {key} must list 3 values"):
        JanusProcessor.from_folder(tmp_path, image_size=S, num_image_tokens=N)


def test_image_files(tmp_path):
    good = tmp_path / "shape.png"
    Image.new("RGBA", (5, 4), (9, 8, 7, 100)).save(good)
    img = load_image(good)
    assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == (9, 8, 7)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png") as e:
        load_image(bad)
    assert isinstance(e.value, InputError)
    with pytest.raises(ValueError, match="missing.png"):
        load_image(tmp_path / "missing.png")
