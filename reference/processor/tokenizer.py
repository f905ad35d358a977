"""The JanusFlow tokenizer, mutated exactly as the official VLChatProcessor mutates it.

Tags missing from the vocabulary are appended as additional special tokens in the official
order (image, generation, begin-of-image, end-of-image), so the new ids match the official
processor's; the pad id is `<｜▁pad▁｜>` when the vocabulary has it, else EOS (JANUSFLOW.md 1.5).

User text can be encoded as plain text (`encode_parts`): the official tokenizer turns every
added-token string, wherever it appears, into its special id, so a question holding
`<｜end▁of▁sentence｜>` or `<begin_of_image>` would end a turn or break the image layout.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from .errors import ProcessorInputError, TokenizerFilesError

log = logging.getLogger(__name__)

PAD_TOKEN = "<｜▁pad▁｜>"


@dataclass(frozen=True)
class Tags:
    image: str = "<image_placeholder>"
    image_start: str = "<begin_of_image>"
    image_end: str = "<end_of_image>"
    image_gen: str = "<｜begin▁of▁generation｜>"

    @classmethod
    def from_processor_config(cls, cfg: dict) -> "Tags":
        d = cls()
        return cls(
            image=cfg.get("image_tag", d.image),
            image_start=cfg.get("image_start_tag", d.image_start),
            image_end=cfg.get("image_end_tag", d.image_end),
            image_gen=cfg.get("image_gen_tag", d.image_gen),
        )


class JanusTokenizer:
    def __init__(self, hf: PreTrainedTokenizerFast, tags: Tags):
        self.hf = hf
        self.tags = tags
        for tag in (tags.image, tags.image_gen, tags.image_start, tags.image_end):
            if tag not in hf.get_vocab():
                hf.add_special_tokens({"additional_special_tokens": [tag]})
                log.info("added tag %s to the tokenizer", tag)
        vocab = hf.get_vocab()
        self.bos_id = int(hf.bos_token_id)
        self.eos_id = int(hf.eos_token_id)
        self.pad_id = int(vocab.get(PAD_TOKEN, self.eos_id))
        self.image_id = vocab[tags.image]
        self.image_start_id = vocab[tags.image_start]
        self.image_end_id = vocab[tags.image_end]
        self.image_gen_id = vocab[tags.image_gen]
        added = hf.added_tokens_decoder
        self.added_ids = frozenset(added)
        # Longest first: Python's alternation takes the first alternative that matches, and the
        # tokenizer's added-token matcher takes the longest match at the leftmost position.
        contents = sorted({t.content for t in added.values() if t.content}, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(map(re.escape, contents))) if contents else None

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids starting with BOS.

        DeepSeek tokenizers prepend BOS in their post-processor; one that does not gets it here,
        because both procedures rely on row position 0 being BOS (the CFG rows keep only it).
        """
        ids = self.hf.encode(text)
        if not ids or ids[0] != self.bos_id:
            ids = [self.bos_id] + ids
        return ids

    def encode_parts(self, parts: Sequence[tuple[str, bool]], plain_user_text: bool = True) -> list[int]:
        """Token ids (starting with BOS) of the concatenated parts; `(text, True)` parts are user text.

        With `plain_user_text`, every added-token string (special tokens and tags) that overlaps
        user text is encoded as ordinary text, through the tokenizer's normaliser, pre-tokeniser
        and model only. The rest is encoded exactly as `encode` would, so ids of text without such
        strings are the official ones. Without it, the official behaviour: such strings become
        their special ids.
        """
        text = "".join(t for t, _ in parts)
        if not plain_user_text or self._added_pattern is None:
            return self.encode(text)
        user, at = [], 0
        for piece, is_user in parts:
            if is_user:
                user.append((at, at + len(piece)))
            at += len(piece)
        # Matches of the template's own tags stay special; those touching user text do not.
        hostile = [m for m in self._added_pattern.finditer(text)
                   if any(m.start() < end and start < m.end() for start, end in user)]
        if not hostile:
            return self.encode(text)
        ids, done = [self.bos_id], 0
        for m in hostile:
            ids += self.hf.encode(text[done:m.start()], add_special_tokens=False) + self._plain_ids(m.group())
            done = m.end()
        return ids + self.hf.encode(text[done:], add_special_tokens=False)

    def _plain_ids(self, text: str) -> list[int]:
        backend = self.hf.backend_tokenizer
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
        ids = [token.id for piece, _ in pieces for token in backend.model.tokenize(piece)]
        # A vocabulary may also hold the special string as an ordinary entry (word-level models do).
        if self.added_ids.intersection(ids):
            raise ProcessorInputError(f"the text {text!r} encodes to a special token even as plain text; remove it")
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file is absent (the code defaults then apply)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFilesError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(folder: str | Path, processor_config: dict | None = None) -> JanusTokenizer:
    """Tokenizer of a checkpoint folder; `processor_config` defaults to its processor_config.json."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise TokenizerFilesError(f"{folder}: no tokenizer.json (the tokenizer file of the checkpoint)")
    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as e:  # the Rust tokenizers library raises a bare Exception on malformed files
        raise TokenizerFilesError(f"{folder / 'tokenizer.json'}: cannot load the tokenizer ({e})") from None
    if hf.bos_token_id is None or hf.eos_token_id is None:
        raise TokenizerFilesError(
            f"{folder}: the tokenizer defines no BOS/EOS token (expected in special_tokens_map.json or tokenizer_config.json)"
        )
    if processor_config is None:
        processor_config = read_json(folder / "processor_config.json")
    return JanusTokenizer(hf, Tags.from_processor_config(processor_config))
