"""`manifest.json`: what a build folder holds, written atomically after everything it lists.

The runtime reads it to learn each graph's files, I/O and dims; rebuilds compare its hashes
and versions to decide what is stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from jfexport.reference.errors import JanusFlowError

MANIFEST = "manifest.json"
FORMAT = "jfexport-manifest/1"


class ManifestError(JanusFlowError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("jfexport", "torch", "onnx", "onnxruntime", "transformers", "diffusers", "tensorrt"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST} (not a jfexport build folder; run `jfexport build` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {data.get('format')!r}, this jfexport reads {FORMAT!r}; rebuild the engines")
    return data
