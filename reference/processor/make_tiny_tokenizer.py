"""Build the tiny preset's tokenizer deterministically: `python -m jfexport.reference.processor.make_tiny_tokenizer OUT`.

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

from .templates import SYSTEM_PROMPT

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL = [BOS, EOS, "<｜▁pad▁｜>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<｜begin▁of▁generation｜>"]
VOCAB_SIZE = 640

COLOURS = "red green blue yellow purple orange white black cyan magenta gray pink".split()
SHAPES = "circle square triangle star cross ring rectangle diamond".split()
PLACES = ["top left", "top right", "bottom left", "bottom right", "center", "middle", "upper", "lower", "corner",
          "left", "right", "top", "bottom"]
COUNTS = "one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9".split()
SIZES = "small big large tiny".split()
QUESTIONS = [
    "What colour is the shape?", "What color is the shape?", "What shape is in the image?", "Where is the shape?",
    "How many shapes are there?", "Is there a {c} {s}?", "Which shape is {c}?", "Describe the image.",
    "What is in the picture?", "What is the background colour?",
]


def corpus() -> list[str]:
    lines = [SYSTEM_PROMPT, "User:", "Assistant:", "yes", "no", "Yes.", "No.", "a an the of and on in at is are there"]
    for c, s, p in itertools.product(COLOURS, SHAPES, PLACES):
        lines.append(f"a {c} {s} at the {p}")
        lines.append(f"There is a {c} {s} in the {p}.")
    for n, z, s in itertools.product(COUNTS, SIZES, SHAPES):
        lines.append(f"{n} {z} {s}s")
    for q, c, s in itertools.product(QUESTIONS, COLOURS, SHAPES):
        lines.append(q.format(c=c, s=s))
    return lines


def build(out: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=SPECIAL[2],
                                 additional_special_tokens=SPECIAL[3:])
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    (out / "processor_config.json").write_text(json.dumps({
        "image_tag": SPECIAL[3], "image_start_tag": SPECIAL[4], "image_end_tag": SPECIAL[5], "image_gen_tag": SPECIAL[6],
        "num_image_tokens": 64, "add_special_token": False, "sft_format": "deepseek", "mask_prompt": True, "ignore_id": -100,
        "processor_class": "VLChatProcessor",
    }, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "VLMImageProcessor", "image_size": 64, "min_size": 14, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "do_normalize": True,
    }, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m jfexport.reference.processor.make_tiny_tokenizer OUT_DIR")
    build(Path(sys.argv[1]))
