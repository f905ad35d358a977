"""`calibration.json` in the build folder: the activation ranges of every INT8 graph, so that a
rebuild quantizes again without recalibrating.

Only ranges are kept (a float per activation tensor), never the recorded tensors. An entry is
used when its key matches: the graph's weights hash, the calibration recipe and the versions of
the tools that name the graph's tensors and compute the activations (torch, onnx, onnxruntime),
and when it has a range for every activation the graph's layers read. The manifest lists the file
with its sha256 like any other file of the build; a file that does not match it is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from jfexport.core.manifest import CalibrationRecord, sha256_file, versions

CACHE_FILE = "calibration.json"
FORMAT = "jfexport-int8-calibration/1"


def cache_key(weights_sha256: str, recipe_key: str) -> dict:
    tools = {k: v for k, v in versions().items() if k in ("torch", "onnx", "onnxruntime")}
    return {"weights_sha256": weights_sha256, "recipe": recipe_key, "versions": tools}


def read_cache(folder: Path, record: CalibrationRecord | None) -> dict[str, dict]:
    """The cached entries by graph, from the file the previous manifest lists (empty when unusable)."""
    if record is None:
        return {}
    path = folder / record.file
    try:
        if sha256_file(path) != record.sha256:
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("graphs", {}) if isinstance(data, dict) and data.get("format") == FORMAT else {}


def usable(entry: dict | None, key: dict, activations: list[str]) -> bool:
    return entry is not None and entry.get("key") == key and set(activations) <= set(entry.get("ranges", {}))


def write_cache(staging: Path, graphs: dict[str, dict]) -> Path:
    path = staging / CACHE_FILE
    path.write_text(json.dumps({"format": FORMAT, "graphs": graphs}, indent=1, sort_keys=True) + "\n")
    return path
