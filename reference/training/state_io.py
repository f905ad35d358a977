"""The resumable training state as one safetensors file: tensors in the body, structure as JSON.

torch.save/torch.load pickle, and unpickling a file runs whatever code it names, so a run folder
from elsewhere could execute code on resume. Here the tensors are raw safetensors data and the
rest (optimizer and scheduler settings, Python RNG states, the step) is JSON in the header's
metadata; loading only ever builds dicts, lists, tuples, numbers, strings and tensors.

Every JSON node is a one-key object naming its type, so dicts with int keys (optimizer state)
and tuples (RNG states, betas) come back as they went in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jfexport.core.errors import CheckpointError

_METADATA_KEY = "jfexport_train_state"
_SCALARS = (bool, int, float, str, type(None))


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        # safetensors refuses tensors sharing storage; state dicts may hand out views.
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [_encode(v, tensors) for v in obj]}
    if isinstance(obj, _SCALARS):
        return {"value": obj}
    raise TypeError(f"training state: cannot store a {type(obj).__name__}")


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"{where}: malformed training state node {str(node)[:80]}")
    (kind, value), = node.items()
    if kind == "value" and isinstance(value, _SCALARS):
        return value
    if kind == "tensor" and isinstance(value, str):
        if value not in tensors:
            raise CheckpointError(f"{where}: training state names a missing tensor {value!r}")
        return tensors[value]
    if kind in ("list", "tuple") and isinstance(value, list):
        items = [_decode(v, tensors, where) for v in value]
        return items if kind == "list" else tuple(items)
    if kind == "dict" and isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value}
    raise CheckpointError(f"{where}: malformed training state node {str(node)[:80]}")


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` through a temporary file, so an interrupted save keeps the old one."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(state, tensors))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_METADATA_KEY: structure})
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a readable training state ({type(e).__name__}: {e})") from None
    if _METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: no training state in the safetensors metadata")
    try:
        structure = json.loads(metadata[_METADATA_KEY])
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: training state metadata is not valid JSON ({e})") from None
    try:
        state = _decode(structure, tensors, str(path))
    except (RecursionError, TypeError) as e:  # nesting too deep; an unhashable dict key
        raise CheckpointError(f"{path}: malformed training state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: training state is not a mapping")
    return state
