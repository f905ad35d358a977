"""Our tokenizer (the `tokenizers` library alone) gives transformers' ids and text on the same files."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from jfexport.reference.bundle import DEFAULT_MODEL_DIR, TINY_ASSETS
from transformers import PreTrainedTokenizerFast

from jfexport.core.processor import load_tokenizer
from jfexport.core.processor.tokenizer import Tags

TEXTS = [
    "a red circle at the top left", "What colour is the shape?", "  leading and trailing  ", "",
    "Ünïcödé — 漢字 and emoji 🙂", "tabs\tand\nnewlines\r\n", "<image_placeholder>", "x<｜end▁of▁sentence｜>y",
    "User: hi\n\nAssistant: it's a test, isn't it ?",
]


def _reference(folder) -> PreTrainedTokenizerFast:
    """transformers' tokenizer, mutated as the official processor mutates it."""
    hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    for tag in (Tags.image, Tags.image_gen, Tags.image_start, Tags.image_end):
        if tag not in hf.get_vocab():
            hf.add_special_tokens({"additional_special_tokens": [tag]})
    return hf


@pytest.mark.parametrize("folder", [TINY_ASSETS, DEFAULT_MODEL_DIR], ids=["tiny", "default"])
def test_ids_and_text_match_transformers(folder):
    ours, theirs = load_tokenizer(folder), _reference(folder)
    assert (ours.bos_id, ours.eos_id, len(ours)) == (theirs.bos_token_id, theirs.eos_token_id, len(theirs))
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(ours)) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), ids


def test_missing_tags_are_appended_like_transformers(tmp_path):
    # A vocabulary without the tags: both append them in the official order, with the same ids.
    shutil.copytree(TINY_ASSETS, tmp_path, dirs_exist_ok=True)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    tags = {Tags.image, Tags.image_gen, Tags.image_start, Tags.image_end}
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in tags]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((tmp_path / name).read_text())
        for key in ("extra_special_tokens", "additional_special_tokens"):
            cfg.pop(key, None)
        (tmp_path / name).write_text(json.dumps(cfg))
    ours, theirs = load_tokenizer(tmp_path), _reference(tmp_path)
    vocab = theirs.get_vocab()
    assert [ours.image_id, ours.image_gen_id, ours.image_start_id, ours.image_end_id] == [
        vocab[Tags.image], vocab[Tags.image_gen], vocab[Tags.image_start], vocab[Tags.image_end]]
    text = "a <begin_of_image> tag"
    assert ours.encode(text) == theirs.encode(text)
