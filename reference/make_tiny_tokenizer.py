"""Build the tiny preset's tokenizer deterministically.

Usage: `python -m jfexport.reference.make_tiny_tokenizer OUT_DIR`.

A byte-level BPE (any text encodes, nothing is unknown) trained on a small built-in corpus of the
words a toy shapes dataset and the chat templates use, with the DeepSeek/Janus special tokens.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from jfexport.core.processor.templates import SYSTEM_PROMPT, generation_prompt, understanding_prompt

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
TAGS = ["<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<｜begin▁of▁generation｜>"]
SPECIAL = [BOS, EOS, PAD, *TAGS]
VOCAB_SIZE = 1000  # an upper bound: training stops earlier once the corpus has no pair left to merge

COLOURS = "red green blue yellow purple orange white black cyan magenta gray pink".split()
SHAPES = "circle square triangle star cross ring rectangle diamond".split()
PLACES = ["top left", "top right", "bottom left", "bottom right", "upper left", "lower right", "center", "middle",
          "corner", "left", "right", "top", "bottom"]
COUNTS = "one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9".split()
SIZES = "small big large tiny".split()
WORDS = ("a an the of and on in at is are there what which where how many colour color shape shapes image "
         "picture background yes no describe user assistant")
QUESTIONS = [
    "What colour is the shape?", "What color is the shape?", "What shape is in the image?", "Where is the shape?",
    "How many shapes are there?", "Is there a {c} {s}?", "Which shape is {c}?", "Describe the image.",
    "What is in the picture?", "What is the background colour?", "describe the picture", "how many {s}s are there?",
    "where is the {c} {s}?", "what color is the {s}?",
]
ANSWERS = [
    "Yes, there is a {c} {s}.", "No, there is no {c} {s}.", "The {s} is {c}.", "It is a {c} {s}.",
    "The background is {c}.", "yes", "no", "Yes.", "No.",
]


def corpus() -> list[str]:
    lines = [SYSTEM_PROMPT, WORDS, WORDS.capitalize(), "? . , : ! ' -"]
    # Whole prompts as the templates render them, so "User:" and "Assistant:" are seen in place.
    lines += [understanding_prompt(q) for q in QUESTIONS[:4]] + [generation_prompt(f"a {c} circle") for c in COLOURS]
    for c, s, p in itertools.product(COLOURS, SHAPES, PLACES):
        lines.append(f"a {c} {s} at the {p}")
        lines.append(f"There is a {c} {s} in the {p}.")
    for n, z, s in itertools.product(COUNTS, SIZES, SHAPES):
        lines.append(f"{n} {z} {s}s")
        lines.append(f"There are {n} {z} {s}s in the image.")
    for z, c, s, b in itertools.product(SIZES, COLOURS, SHAPES, COLOURS):
        lines.append(f"a {z} {c} {s} on a {b} background")
    for q, c, s in itertools.product(QUESTIONS + ANSWERS, COLOURS, SHAPES):
        lines.append(q.format(c=c, s=s))
    return lines


def build(out: Path) -> None:
    """Write the tokenizer and processor files of the tiny preset into `out`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # BOS on every encode, as the DeepSeek tokenizers' post-processor does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, additional_special_tokens=TAGS
    )
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    # Recent transformers no longer write this file; the official checkpoints ship it.
    _write_json(out / "special_tokens_map.json", {
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": TAGS,
    })
    _write_json(out / "processor_config.json", {
        "image_tag": TAGS[0], "image_start_tag": TAGS[1], "image_end_tag": TAGS[2], "image_gen_tag": TAGS[3],
        "num_image_tokens": 64, "add_special_token": False, "sft_format": "deepseek", "mask_prompt": True,
        "ignore_id": -100, "processor_class": "VLChatProcessor",
    })
    _write_json(out / "preprocessor_config.json", {
        "image_processor_type": "VLMImageProcessor", "image_size": 64, "min_size": 14, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "do_normalize": True,
    })


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m jfexport.reference.make_tiny_tokenizer OUT_DIR")
    build(Path(sys.argv[1]))
