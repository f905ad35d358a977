"""The one interface every backend implements: named tensors in, named tensors out.

Names and shapes are the graph contract of DESIGN.md ("The graph set"). Backends cast floating
feeds to the dtype their graph declares, so pipelines can hand over fp32 tensors to fp16 engines.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import torch

from jfexport.core.graph_contract import GRAPH_NAMES

__all__ = ["Engine", "GRAPH_NAMES"]


class Engine(Protocol):
    name: str

    def run(self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor] | None = None,
            names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Run on `feeds`; write into `outputs` where given and the backend can (else they are ignored).
        `names`: the outputs wanted (default all); the others are not fetched where the backend can skip them."""
        ...
