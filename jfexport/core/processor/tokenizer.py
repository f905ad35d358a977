"""The JanusFlow tokenizer, mutated exactly as the official VLChatProcessor mutates it.

Tags missing from the vocabulary are appended as additional special tokens in the official
order (image, generation, begin-of-image, end-of-image), so the new ids match the official
processor's; the pad id is `<｜▁pad▁｜>` when the vocabulary has it, else EOS (JANUSFLOW.md 1.5).

User text can be encoded as plain text (`encode_parts`): the official tokenizer turns every
added-token string, wherever it appears, into its special id, so a question holding
`<｜end▁of▁sentence｜>` or `<begin_of_image>` would end a turn or break the image layout.

The files are read with the `tokenizers` library itself, the engine under transformers' fast
tokenizers, so that serving loads no transformers: BOS/EOS come from special_tokens_map.json
(over tokenizer_config.json) as transformers resolves them, and tests hold the ids and the
decoded text to transformers' `PreTrainedTokenizerFast` on the same files.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders

from jfexport.core import json_file
from jfexport.core.processor.errors import ProcessorInputError, TokenizerFilesError

log = logging.getLogger(__name__)

PAD_TOKEN = "<｜▁pad▁｜>"


def _byte_level_table() -> dict[str, int]:
    """The characters a byte-level BPE (GPT-2's `bytes_to_unicode`) spells each byte with, to their byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_table()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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
    def __init__(self, backend: Tokenizer, tags: Tags, bos_token: str, eos_token: str,
                 clean_up_spaces: bool = False):
        self.backend = backend
        self.tags = tags
        self.clean_up_spaces = clean_up_spaces
        for tag in (tags.image, tags.image_gen, tags.image_start, tags.image_end):
            if backend.token_to_id(tag) is None:
                # As transformers' add_special_tokens: a special token, never normalised or stripped.
                backend.add_special_tokens([AddedToken(tag, special=True, normalized=False)])
                log.info("added tag %s to the tokenizer", tag)
        vocab = backend.get_vocab(with_added_tokens=True)
        self.bos_id = self._id(vocab, bos_token, "BOS")
        self.eos_id = self._id(vocab, eos_token, "EOS")
        self.pad_id = int(vocab.get(PAD_TOKEN, self.eos_id))
        self.image_id = vocab[tags.image]
        self.image_start_id = vocab[tags.image_start]
        self.image_end_id = vocab[tags.image_end]
        self.image_gen_id = vocab[tags.image_gen]
        added = backend.get_added_tokens_decoder()
        self.added_ids = frozenset(added)
        # Longest first: Python's alternation takes the first alternative that matches, and the
        # tokenizer's added-token matcher takes the longest match at the leftmost position.
        contents = sorted({t.content for t in added.values() if t.content}, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(map(re.escape, contents))) if contents else None

    @staticmethod
    def _id(vocab: dict[str, int], token: str, role: str) -> int:
        if token not in vocab:
            raise TokenizerFilesError(f"the {role} token {token!r} is not in tokenizer.json")
        return int(vocab[token])

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch, not encode: the same ids, but it releases the GIL while it works, where
        # encode holds it throughout (0.4 s for 260 k characters, during which a server's event
        # loop and every other thread of the process stand still).
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode(self, text: str) -> list[int]:
        """Token ids starting with BOS.

        DeepSeek tokenizers prepend BOS in their post-processor; one that does not gets it here,
        because both procedures rely on row position 0 being BOS (the CFG rows keep only it).
        """
        ids = self._ids(text, add_special_tokens=True)
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
        starts, ends, at = [], [], 0
        for piece, is_user in parts:
            if is_user:
                starts.append(at)
                ends.append(at + len(piece))
            at += len(piece)

        def touches_user_text(m: re.Match) -> bool:
            # The user spans are sorted and disjoint: the one ending first after m's start decides
            # (a bisection, not a scan of every span per match, which is quadratic in the turns).
            k = bisect.bisect_right(ends, m.start())
            return k < len(starts) and starts[k] < m.end()

        # Matches of the template's own tags stay special; those touching user text do not.
        hostile = [m for m in self._added_pattern.finditer(text) if touches_user_text(m)]
        if not hostile:
            return self.encode(text)
        ids, done = [self.bos_id], 0
        for m in hostile:
            ids += self._ids(text[done:m.start()], add_special_tokens=False) + self._plain_ids(m.group())
            done = m.end()
        return ids + self._ids(text[done:], add_special_tokens=False)

    def _plain_ids(self, text: str) -> list[int]:
        backend = self.backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
        ids = [token.id for piece, _ in pieces for token in backend.model.tokenize(piece)]
        # A vocabulary may also hold the special string as an ordinary entry (word-level models do).
        if self.added_ids.intersection(ids):
            raise ProcessorInputError(f"the text {text!r} encodes to a special token even as plain text; remove it")
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for alone: a byte-level token may hold part of a UTF-8 character,
        which decoding it alone would turn into U+FFFD."""
        piece = self.backend.id_to_token(token_id)
        if piece is not None and token_id not in self.added_ids:
            if isinstance(self.backend.decoder, decoders.ByteLevel) and all(c in _BYTE_OF for c in piece):
                return bytes(_BYTE_OF[c] for c in piece)
            if m := _BYTE_FALLBACK.fullmatch(piece):
                return bytes([int(m[1], 16)])
        return self.decode([token_id], skip_special_tokens=False).encode()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (for tokenizers configured with it): no space before
    punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _token_content(value: object) -> str | None:
    """A special token as the config files write it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file is absent (the code defaults then apply)."""
    if not path.is_file():
        return {}
    value = json_file.read_json(path, TokenizerFilesError)
    if not isinstance(value, dict):
        raise TokenizerFilesError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def load_tokenizer(folder: str | Path, processor_config: dict | None = None) -> JanusTokenizer:
    """Tokenizer of a checkpoint folder; `processor_config` defaults to its processor_config.json."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise TokenizerFilesError(f"{folder}: no tokenizer.json (the tokenizer file of the checkpoint)")
    try:
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # the Rust tokenizers library raises a bare Exception on malformed files
        raise TokenizerFilesError(f"{folder / 'tokenizer.json'}: cannot load the tokenizer ({e})") from None
    config = read_json(folder / "tokenizer_config.json")
    # special_tokens_map.json overrides tokenizer_config.json, as in transformers' loader.
    special = {**config, **read_json(folder / "special_tokens_map.json")}
    bos, eos = _token_content(special.get("bos_token")), _token_content(special.get("eos_token"))
    if bos is None or eos is None:
        raise TokenizerFilesError(
            f"{folder}: the tokenizer defines no BOS/EOS token (expected in special_tokens_map.json or tokenizer_config.json)"
        )
    if processor_config is None:
        processor_config = read_json(folder / "processor_config.json")
    return JanusTokenizer(backend, Tags.from_processor_config(processor_config), bos, eos,
                          bool(config.get("clean_up_tokenization_spaces", False)))
