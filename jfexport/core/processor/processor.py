"""Batches for the two tasks, laid out as the official VLChatProcessor lays them out.

Hostile text: by default the user's prompt or question is tokenized as plain text, so a
special-token or tag string in it (`<image_placeholder>`, `<begin_of_image>`,
`<｜end▁of▁sentence｜>`, the pad token, any added token) is read by the model as the characters
it consists of, never as the token: a question cannot end the user turn, forge an assistant
turn or add an image slot. The template's own tags are unaffected. `official_special_text=True`
restores the official behaviour (such strings become special ids), for parity tests against the
official processor; a question whose image tags would then break the image layout is refused
with a ProcessorInputError instead of failing later in the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from jfexport.core.processor.errors import ProcessorInputError, TokenizerFilesError
from jfexport.core.processor.image import MAX_PIXELS, check_image_size, preprocess_image, to_rgb
from jfexport.core.processor.request_checks import check_prompt, check_text
from jfexport.core.processor.templates import (
    SEP2,
    SYSTEM_PROMPT,
    Parts,
    check_turns,
    conversation_parts,
    generation_parts,
    understanding_parts,
)
from jfexport.core.processor.tokenizer import JanusTokenizer, Tags, load_tokenizer, read_json


@dataclass
class UnderstandingBatch:
    input_ids: torch.Tensor  # [B,T] int64, left-padded with pad_id
    attention_mask: torch.Tensor  # [B,T] int64, 0 on pads
    images_seq_mask: torch.Tensor  # [B,T] bool: BOI + the N placeholder positions
    images_emb_mask: torch.Tensor  # [B,1,1+N] bool
    pixel_values: torch.Tensor  # [B,1,3,S,S] float32, normalised


@dataclass
class GenerationBatch:
    input_ids: torch.Tensor  # [B,L] int64: BOS, prompt, image tag; left-padded with pad_id
    attention_mask: torch.Tensor  # [B,L] int64, 0 on pads


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def _rgb(pre: dict, key: str, folder: Path) -> tuple[float, float, float]:
    """preprocessor_config.json's per-channel `key` (default 0.5 each): exactly one value per RGB channel."""
    values = pre.get(key, (0.5, 0.5, 0.5))
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise TokenizerFilesError(f"{folder / 'preprocessor_config.json'}: {key} must list 3 values (R, G, B), got {values!r}")
    r, g, b = values
    return r, g, b


class JanusProcessor:
    def __init__(
        self,
        tokenizer: JanusTokenizer,
        image_size: int,
        num_image_tokens: int,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        min_size: int = 14,
        normalize: bool = True,
        system_prompt: str = SYSTEM_PROMPT,
        official_special_text: bool = False,
        max_pixels: int = MAX_PIXELS,
    ):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.mean, self.std, self.min_size, self.normalize = mean, std, min_size, normalize
        self.system_prompt = system_prompt
        self.official_special_text = official_special_text
        self.max_pixels = max_pixels

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        image_size: int,
        num_image_tokens: int,
        official_special_text: bool = False,
        max_pixels: int = MAX_PIXELS,
    ) -> "JanusProcessor":
        """Processor of a checkpoint folder; absent config files or keys take the code defaults.

        A `background_color` key in preprocessor_config.json is ignored, as the official
        VLMImageProcessor ignores it: the background is always derived from `image_mean`.
        """
        folder = Path(folder)
        tokenizer = load_tokenizer(folder, read_json(folder / "processor_config.json"))
        pre = read_json(folder / "preprocessor_config.json")
        return cls(
            tokenizer, image_size, num_image_tokens,
            mean=_rgb(pre, "image_mean", folder),
            std=_rgb(pre, "image_std", folder),
            min_size=int(pre.get("min_size", 14)),
            normalize=bool(pre.get("do_normalize", True)),
            official_special_text=official_special_text,
            max_pixels=max_pixels,
        )

    @property
    def tags(self) -> Tags:
        return self.tokenizer.tags

    def _encode(self, name: str, parts: Parts) -> list[int]:
        try:
            return self.tokenizer.encode_parts(parts, plain_user_text=not self.official_special_text)
        except ProcessorInputError as e:
            raise ProcessorInputError(f"{name}: {e}") from None

    def understanding_ids(self, question: str, system_prompt: str | None = None) -> list[int]:
        """Template, tokenise, then replace the placeholder by BOI + N image ids + EOI.

        `system_prompt` replaces the processor's own for this question (None keeps it); it is
        a request's text, so it is tokenized as plain text, as the question is."""
        tok = self.tokenizer
        question = check_text("question", question)
        if system_prompt is None:
            parts = understanding_parts(question, self.system_prompt, self.tags.image)
        else:
            parts = understanding_parts(question, check_text("system_prompt", system_prompt), self.tags.image,
                                        system_is_user_text=True)
        ids = self._encode("question", parts)
        if (found := ids.count(tok.image_id)) != 1:
            raise ProcessorInputError(
                f"question: the prompt must hold the image tag {self.tags.image!r} once, as one token; found {found}"
                " (a question must not contain it)"
            )
        # The begin-of-image slot receives the image embedding: a second one breaks the layout.
        if tok.image_start_id in ids:
            raise ProcessorInputError(f"question: must not contain the begin-of-image tag {self.tags.image_start!r}")
        return self._expand_image(ids)

    def _expand_image(self, ids: list[int]) -> list[int]:
        """The placeholder replaced by BOI + N image ids + EOI (the official `add_image_token`)."""
        tok = self.tokenizer
        at = ids.index(tok.image_id)
        block = [tok.image_start_id] + [tok.image_id] * self.num_image_tokens + [tok.image_end_id]
        return ids[:at] + block + ids[at + 1:]

    def conversation_ids(self, turns, image_turn: int = 0, system_prompt: str | None = None,
                         names=None) -> list[int]:
        """Ids of a whole conversation in the official multi-turn format (`templates.conversation_parts`).

        `turns`: (role, text) pairs, "user"/"assistant", alternating, starting and ending with
        the user's question; the one image sits in the user turn `image_turn` (the first by
        default). The text of every turn, and a `system_prompt` given here, is tokenized as plain
        text; the template's separators (the EOS closing each assistant turn) stay special ids.
        One user turn gives exactly `understanding_ids(text, system_prompt)`. `names[i]` names
        turn i in errors (default `turns[i]`).
        """
        tok = self.tokenizer
        check_turns(turns, image_turn, names)
        name = (lambda i: names[i]) if names is not None else (lambda i: f"turns[{i}]")
        turns = [(role, check_text(name(i), text)) for i, (role, text) in enumerate(turns)]
        if system_prompt is None:
            parts = conversation_parts(turns, image_turn, self.system_prompt, self.tags.image, names=names)
        else:
            parts = conversation_parts(turns, image_turn, check_text("system_prompt", system_prompt), self.tags.image,
                                       system_is_user_text=True, names=names)
        ids = self._encode("conversation", parts)

        def culprit(*tags: str) -> str:
            return next((name(i) for i, (_, text) in enumerate(turns) if any(t in text for t in tags)), "conversation")

        if (found := ids.count(tok.image_id)) != 1:
            raise ProcessorInputError(
                f"{culprit(self.tags.image)}: the prompt must hold the image tag {self.tags.image!r} once, as one "
                f"token; found {found} (the text of a turn must not contain it)")
        if tok.image_start_id in ids:
            raise ProcessorInputError(
                f"{culprit(self.tags.image_start)}: must not contain the begin-of-image tag {self.tags.image_start!r}")
        if not self.official_special_text:
            # Each assistant turn is closed by the template's EOS, and nothing else may be one.
            closed = sum(role == "assistant" for role, _ in turns)
            eos = ids.count(tok.eos_id) if tok.encode(SEP2)[1:] == [tok.eos_id] else closed
            if eos != closed:
                raise ProcessorInputError(f"conversation: {eos} end-of-sentence tokens for {closed} assistant turn(s); "
                                          "the text of a turn must not merge with the template's separator")
        return self._expand_image(ids)

    def understanding_batch(self, questions: list[str], images: list[Image.Image]) -> UnderstandingBatch:
        """One image per question; rows left-padded to the longest, as the official batchify."""
        if len(questions) != len(images) or not questions:
            raise ProcessorInputError(f"need one image per question, got {len(images)} images for {len(questions)} questions")
        return self.understanding_rows([self.understanding_ids(q) for q in questions],
                                       [self.pixel_values(img, f"images[{i}]") for i, img in enumerate(images)])

    def pixel_values(self, image: Image.Image, name: str = "image") -> torch.Tensor:
        """[3,S,S] normalised pixels of one image; its size is checked before a lazy image is decoded."""
        if not isinstance(image, Image.Image):
            raise ProcessorInputError(f"{name}: expected a PIL image, got {type(image).__name__}")
        check_image_size(image, self.max_pixels, name)
        rgb = to_rgb(image, name)
        return preprocess_image(rgb, self.image_size, self.mean, self.std, self.min_size, self.normalize)

    def understanding_rows(self, rows: list[list[int]], pixels: list[torch.Tensor]) -> UnderstandingBatch:
        """Rows of `understanding_ids` and their `pixel_values`, left-padded into one batch (the
        serving scheduler prepares rows when requests arrive and batches them when they are admitted)."""
        tok = self.tokenizer
        ids, mask = left_pad(rows, tok.pad_id)
        return UnderstandingBatch(
            input_ids=ids,
            attention_mask=mask,
            # Pads are excluded as in the official batchify, which masks only each row's own tokens.
            images_seq_mask=((ids == tok.image_id) | (ids == tok.image_start_id)) & mask.bool(),
            images_emb_mask=torch.ones(len(rows), 1, self.num_image_tokens + 1, dtype=torch.bool),
            pixel_values=torch.stack(pixels)[:, None],
        )

    def generation_ids(self, prompt: str) -> list[int]:
        """[BOS, prompt tokens..., image_start tag], as the official demo tokenises the prompt."""
        ids = self._encode("prompt", generation_parts(check_prompt(prompt), self.tags.image_start))
        # Dropping the last token removes the tag only if it is exactly one token.
        if ids[-1] != self.tokenizer.image_start_id:
            raise ProcessorInputError(f"prompt: the image tag {self.tags.image_start!r} does not encode to one final token")
        return ids

    def generation_tokens(self, prompts: list[str]) -> GenerationBatch:
        """Conditional token rows of text-to-image generation, left-padded to the longest prompt.

        The official procedure appends the begin-of-image tag and then drops it again: the last
        column here is that tag, and the sampler keeps only `input_ids[:, :-1]` (the time token
        takes the tag's position). The official demo runs one prompt at a time; left padding with a
        0 attention mask lets prompts of different lengths share a batch.
        """
        if not prompts:
            raise ProcessorInputError("no prompt given")
        ids, mask = left_pad([self.generation_ids(p) for p in prompts], self.tokenizer.pad_id)
        return GenerationBatch(ids, mask)
