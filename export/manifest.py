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

# The runtime owns the manifest's name, format tag and reader: it must open builds without the exporter.
from jfexport.runtime.engines_folder import FORMAT, MANIFEST, EnginesError, read_build_manifest

__all__ = ["FORMAT", "MANIFEST", "EnginesError", "read_build_manifest", "sha256_file", "versions", "write_manifest"]


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


def write_manifest(folder: Path, data: dict[str, Any], scratch: Path | None = None) -> None:
    """Replace `folder`'s manifest atomically and durably: readers see the old one or the new one, whole.

    The new manifest is written in `scratch` (a build's staging folder, on the same filesystem: a kill
    leaves it there, for the next build to remove with the staging folder), else in `folder`."""
    fd, tmp = tempfile.mkstemp(dir=scratch or folder, prefix=".manifest.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a manifest is read by whoever serves the engines
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Without this fsync a power cut could bring back the old directory entry after the new files' removal.
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
