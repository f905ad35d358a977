"""What a graph is, as data: tensors with named dims, and the range of every dynamic dim.

One GraphSpec per graph drives the ONNX export (dynamic shapes, names), the validation shapes,
the TensorRT optimisation profiles and the manifest the runtime reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "float16", "bfloat16", "int64", "bool")


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: the range engines must accept and the value it is exported at."""

    name: str
    min: int
    opt: int
    max: int
    sample: int  # export sample: >= 2 and distinct from every other dim's sample (a 1 would specialise)

    def __post_init__(self) -> None:
        if not self.min <= self.opt <= self.max or not self.min <= self.sample <= self.max:
            raise ValueError(f"dim {self.name}: need min <= opt, sample <= max, got {self}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # one of DTYPES; floating tensors take the graph precision unless `keep_dtype`
    shape: tuple[int | str, ...]  # ints are static, strings name a Dim or a sum "P + T"
    keep_dtype: bool = False  # e.g. timesteps stay float32 in an fp16 graph (the sinusoid needs it)

    def resolve(self, values: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else sum(values[p.strip()] for p in d.split("+")) for d in self.shape)

    def typed(self, precision: str) -> "TensorSpec":
        if self.dtype == "float32" and not self.keep_dtype and precision == "fp16":
            return TensorSpec(self.name, "float16", self.shape, self.keep_dtype)
        return self


@dataclass
class GraphSpec:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, Dim]
    precisions: tuple[str, ...] = ("fp32", "fp16")
    extra: dict[str, Any] = field(default_factory=dict)  # static facts a runtime needs (layers, grid, ...)

    def dim_values(self, which: str) -> dict[str, int]:
        """Dim values at `which` in ("min", "opt", "max", "sample")."""
        return {name: getattr(d, which) for name, d in self.dims.items()}

    def typed(self, precision: str) -> "GraphSpec":
        return GraphSpec(self.name, [t.typed(precision) for t in self.inputs], [t.typed(precision) for t in self.outputs],
                         self.dims, self.precisions, self.extra)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.outputs],
            "dims": {n: {"min": d.min, "opt": d.opt, "max": d.max} for n, d in self.dims.items()},
            **({"extra": self.extra} if self.extra else {}),
        }
