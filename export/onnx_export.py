"""Export one graph module to ONNX with the dynamo exporter, named dynamic dims and, for
graphs over 2 GB, external data. Files are written into a staging folder and only moved to
their final names by the caller once validation has passed."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from jfexport.core.graph_spec import GraphSpec

from .samples import sample_inputs

log = logging.getLogger(__name__)

TWO_GB = 2**31
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def graph_file(name: str, precision: str) -> str:
    return f"{name}.onnx" if precision == "fp32" else f"{name}.{precision}.onnx"


def typed_feeds(spec: GraphSpec, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast feeds to the dtypes of a (typed) spec."""
    return {t.name: feeds[t.name].to(_TORCH[t.dtype]) for t in spec.inputs}


def _export_args(module: nn.Module, spec: GraphSpec, feeds: dict[str, torch.Tensor]) -> tuple[tuple, list]:
    """(flat args, dynamic_shapes): shapes follow the signature, so trailing *varargs form one tuple."""
    dims = {n: torch.export.Dim(n, min=d.min, max=d.max) for n, d in spec.dims.items()}

    def dyn(shape: tuple) -> dict[int, object]:
        # A sum such as "P + T" is left for the exporter to derive (torch.export has no sum of dims).
        return {i: dims[d] if d in dims else torch.export.Dim.DYNAMIC for i, d in enumerate(shape) if isinstance(d, str)}

    names = [t.name for t in spec.inputs]
    shapes = [dyn(t.shape) for t in spec.inputs]
    params = inspect.signature(module.forward).parameters.values()
    fixed = sum(1 for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)
    has_varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    args = [feeds[n] for n in names]
    if has_varargs and len(args) > fixed:
        return tuple(args), [*shapes[:fixed], tuple(shapes[fixed:])]
    return tuple(args), shapes


def _name_dims(path: Path, spec: GraphSpec) -> None:
    """Give every dynamic dim of the graph I/O its spec name (the exporter invents some, e.g. s53)."""
    model = onnx.load(str(path), load_external_data=False)
    for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        by_name = {t.name: t for t in tensors}
        for vi in values:
            for dim, want in zip(vi.type.tensor_type.shape.dim, by_name[vi.name].shape):
                if isinstance(want, str):
                    dim.dim_param = want
    onnx.save(model, str(path))


def export_graph(module: nn.Module, spec: GraphSpec, precision: str, staging: Path) -> Path:
    """Export `module` (already in the precision's dtype) to `staging/<file>`; returns the path."""
    typed = spec.typed(precision)
    feeds = typed_feeds(typed, sample_inputs(spec, spec.dim_values("sample")))
    args, dynamic_shapes = _export_args(module, typed, feeds)
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    path = staging / graph_file(spec.name, precision)
    # The exporter prints its own step banners and warns about torchvision ops we never use;
    # `jfexport` reports progress per graph instead.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=[t.name for t in typed.inputs],
            output_names=[t.name for t in typed.outputs], dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
        )
    if program is None:  # only the legacy exporter (dynamo=False) returns nothing
        raise RuntimeError(f"{spec.name}: torch.onnx.export returned no ONNXProgram")
    program.save(str(path), external_data=params >= TWO_GB - (64 << 20))
    del program
    _name_dims(path, typed)
    onnx.checker.check_model(str(path), full_check=False)  # path-based: works with external data
    return path
