"""Understanding prefill (vision encoder, embeddings, image splice, LLM prefill) over static
buffers, captured as a CUDA graph per (row bucket, prompt-length bucket) on CUDA.

Time to first token is this prefill: eager, it is hundreds of kernel launches for one question.
Rows are padded to a power of two and the prompt width (left-padded, masked) to a multiple of
`PREFILL_BUCKET`, so a bucket's graph serves every batch that fits it. The official splice
(`embeds[images_seq_mask] = blocks[images_emb_mask]`) has data-dependent shapes, which a graph
cannot hold: the host turns the two masks into one gather index (`core.layout.image_gather_index`,
the splice every path uses), loaded into a static buffer. Outputs are in the `llm_prefill` contract's names.
"""

from __future__ import annotations

import torch

from jfexport.core.graph_contract import kv_name
from jfexport.core.layout import image_gather_index, splice_image_embeds, understanding_positions

from ..lru import LRU
from .torch_step import capture_or_none

# Prompt widths are rounded up to this: 628 tokens run as 640 (a power of two would be 1024).
PREFILL_BUCKET = 128


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _Prefill:
    def __init__(self, rows: int, width: int, pixels: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.ids = torch.zeros((rows, width), dtype=torch.long, device=device)
        self.mask = torch.zeros((rows, width), dtype=torch.long, device=device)
        self.pixels = torch.zeros((rows * pixels[0], *pixels[1:]), dtype=dtype, device=device)
        self.index = torch.zeros(rows * width, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graph: torch.cuda.CUDAGraph | None = None


class PrefillGraphs:
    def __init__(self, model, pad_id: int, max_len: int, cuda_graphs: bool):
        self.model, self.pad_id, self.max_len, self.cuda_graphs = model, pad_id, max_len, cuda_graphs
        self._states: LRU[tuple[int, int, tuple[int, ...]], _Prefill] = LRU()

    def run(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(llm_prefill outputs of the batch's n rows, their attention mask [n, W]) for a processor batch."""
        param = next(self.model.parameters())
        n, width = batch.input_ids.shape
        rows, wide = _pow2(n), min(self.max_len, -(-width // PREFILL_BUCKET) * PREFILL_BUCKET)
        key = (rows, wide, tuple(batch.pixel_values.shape[1:]))
        state = self._states.get(key)
        if state is None:
            state = _Prefill(rows, wide, key[2], param.dtype, param.device)
            self._states.put(key, state)
        self._load(state, batch)
        if self.cuda_graphs and param.device.type == "cuda" and state.graph is None:
            state.graph = capture_or_none(lambda: self._compute(state))  # writes only its outputs
            self.cuda_graphs = state.graph is not None
        if state.graph is not None:
            state.graph.replay()
        else:
            self._compute(state)
        # The K/V are copied into the store before the next prefill; the logits are kept longer
        # (the first token's, for callers that want them), and a replay would overwrite them.
        if state.logits is None:
            raise RuntimeError("the prefill ran without writing its logits")
        out = {"logits": state.logits[:n].clone()}
        for layer, (k, v) in enumerate(state.present):
            out[kv_name("present", layer, "key")], out[kv_name("present", layer, "value")] = k[:n], v[:n]
        return out, state.mask[:n]

    def _load(self, s: _Prefill, batch) -> None:
        n, width = batch.input_ids.shape
        rows, wide = s.ids.shape
        cols = slice(wide - width, wide)
        ids = torch.full((rows, wide), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, wide), dtype=torch.long)
        seq = torch.zeros((rows, wide), dtype=torch.bool)
        ids[:n, cols], mask[:n, cols], seq[:n, cols] = batch.input_ids, batch.attention_mask, batch.images_seq_mask
        emb = torch.zeros((rows, *batch.images_emb_mask.shape[1:]), dtype=torch.bool)
        emb[:n] = batch.images_emb_mask
        index = image_gather_index(seq, emb)
        pixels = torch.zeros((rows, *batch.pixel_values.shape[1:]), dtype=s.pixels.dtype)
        pixels[:n] = batch.pixel_values
        s.ids.copy_(ids)
        s.mask.copy_(mask)
        s.index.copy_(index)
        s.pixels.copy_(pixels.flatten(0, 1))

    def _compute(self, s: _Prefill) -> None:
        model = self.model
        embeds = splice_image_embeds(model.embed_tokens(s.ids), model.encode_images(s.pixels), s.index)
        hidden, present, _ = model.llm(embeds, s.mask, understanding_positions(s.mask))
        s.logits = model.logits(hidden[:, -1]).float()
        s.present = present
