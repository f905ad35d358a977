"""Inputs for a graph at given dim values, with the semantics the graph expects.

Masks are left-padded (one padded row when the batch has several), positions follow them as
the runtime computes them, ids lie in the vocabulary and timesteps in [0, 1000).
"""

from __future__ import annotations

import torch

from jfexport.core.graph_spec import GraphSpec
from jfexport.core.layout import understanding_positions

_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def left_padded_mask(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.int64)
    if batch > 1 and length > 1:
        pad = int(torch.randint(1, length, (1,), generator=generator))
        mask[-1, :pad] = 0
    return mask


def sample_inputs(spec: GraphSpec, values: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feeds: dict[str, torch.Tensor] = {}
    for t in spec.inputs:
        shape = t.resolve(values)
        if t.name == "input_ids":
            feeds[t.name] = torch.randint(0, spec.extra["vocab"], shape, generator=gen)
        elif t.name == "attention_mask":
            feeds[t.name] = left_padded_mask(shape[0], shape[1], gen)
        elif t.name == "position_ids":
            continue  # derived from the mask below
        elif t.name == "timesteps":
            feeds[t.name] = torch.rand(shape, generator=gen) * 1000
        else:
            feeds[t.name] = torch.randn(shape, generator=gen, dtype=torch.float32)
    if "position_ids" in {t.name for t in spec.inputs}:
        new = feeds["inputs_embeds"].shape[1]
        feeds["position_ids"] = understanding_positions(feeds["attention_mask"])[:, -new:].contiguous()
    return feeds


def meaningful(name: str, output: torch.Tensor, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """The elements of an LLM output that carry meaning: left-padded positions are dropped.

    A padded query row attends to nothing, so its hidden state (and the K/V computed from it in
    later layers) is arbitrary and differs between precisions; no valid row ever reads it.
    """
    if "attention_mask" not in feeds:
        return output
    mask = feeds["attention_mask"].bool()
    if name == "hidden_states":
        return output[mask[:, -output.shape[1]:]]
    if name.startswith(("present.", "new.")):
        return output.transpose(1, 2)[mask[:, -output.shape[2]:]]
    return output
