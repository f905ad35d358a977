"""manifest.json, typed: what a build (or an export) folder holds, read and checked in one place, written atomically.

The exporter builds a `Manifest` and writes it after everything it lists; the runtime reads it back
(`Manifest.read`) before any graph file is opened. Reading does all the checking: a bad manifest
fails here, naming the key path (`manifest.json: limits.max_seq: expected a positive int, got "x"`),
not later as a KeyError, a TypeError in a length check or an ONNX Runtime shape error in the
middle of a request. Besides types, the facts the runtime relies on that are stated twice (grid,
latent size, image size, limits against the graph specs and the model) must agree.

There is one format. A manifest of an older format is refused whole, naming the format found and
the fix (rebuild), instead of being read with its older variants filled in: format 2 could list
external data by name only, leave out the tokenizer record or the INT8 weight-scheme record, and
the runtime carried each of those cases. Records that the runtime only reports (parity figures,
the model's full config, the INT8 gate's checks, per-layer tables) are kept as the build wrote
them.

This module imports no model code (no torch, transformers, diffusers, runtime or exporter).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal, overload

from jfexport.core.errors import UserError
from jfexport.core.graph_contract import GRAPH_NAMES
from jfexport.core.json_file import read_json

MANIFEST = "manifest.json"
# Format 3: one shape per record, every file hashed, the tokenizer and INT8 records always present where
# they apply. Format 2 builds carried older variants of those records; format 1 builds returned past + new
# K/V (`present.*`) from llm_decode. Both are refused, not adapted.
FORMAT = "jfexport-manifest/3"
_OLD_FORMATS = {
    "jfexport-manifest/1": "its llm_decode returns past + new K/V (`present.*`), this runtime's returns only the new "
                           "K/V (`new.*`) and updates its cache in place",
    "jfexport-manifest/2": "its records may list files without a hash and builds without their tokenizer or INT8 "
                           "weight-scheme record, which this runtime requires",
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
BACKENDS = ("onnxruntime", "tensorrt")
TOKENIZER_DIR = "tokenizer"  # the fixed path, a link to the build's `tokenizer_dir` (export folders: none)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 24


class EnginesError(UserError):
    """A build folder the runtime refuses to serve; the message names the file, graph or key at fault."""


# --- records -------------------------------------------------------------------------------------------


class _Flat:
    """A record written as its fields (nested values are plain JSON already)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass


@dataclass
class FileRecord:
    """A file as the build recorded it: the runtime compares it with the file before serving it."""

    file: str  # relative to the build folder
    sha256: str
    size: int | None = None  # recorded for graph files and their external data

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, **({"size": self.size} if self.size is not None else {})}


@dataclass
class EngineRecord(_Flat):
    """A TensorRT engine built from a graph file, tied to the TensorRT version and the GPU it was built on."""

    file: str
    sha256: str
    tensorrt: str
    compute_capability: str
    onnx_sha256: str  # the graph file it was built from
    profiles: int


@dataclass
class GraphFile:
    """One precision of a graph: its ONNX file, external data, parity against PyTorch, and engine if built."""

    file: str
    sha256: str
    size: int
    external_data: list[FileRecord]
    parity: dict[str, Any]  # the parity check against PyTorch, as reported (the runtime does not read it)
    export_seconds: float | None = None  # fp32/fp16 files: how long the export took
    peak_rss_gib: float | None = None
    layers: list[dict[str, Any]] | None = None  # INT8 files: the per-layer error table
    engine: EngineRecord | None = None

    @classmethod
    def recorded(cls, folder: Path, name: str, external: list[str], parity: dict[str, Any], **fields: Any) -> "GraphFile":
        """The graph file `folder/name` as a build records it, hashed and sized now, with its external-data
        files (hashed like the graph file: the weights of a graph over 2 GB live there)."""
        path = folder / name
        return cls(name, sha256_file(path), path.stat().st_size, [file_record(folder, e) for e in external], parity,
                   **fields)

    @property
    def record(self) -> FileRecord:
        return FileRecord(self.file, self.sha256, self.size)

    def names(self) -> list[str]:
        """The graph file, then its external-data files."""
        return [self.file, *(e.file for e in self.external_data)]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.record.to_json(), "external_data": [e.to_json() for e in self.external_data],
                               "parity": self.parity}
        for key in ("export_seconds", "peak_rss_gib", "layers"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.engine is not None:
            out["engine"] = self.engine.to_json()
        return out


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints are static, strings name a dim or a sum of dims ("P + T")


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int


@dataclass
class SpecRecord:
    """A graph's I/O and dim ranges as the export wrote them (GraphSpec.to_json): what the runtime binds by."""

    inputs: list[TensorRecord]
    outputs: list[TensorRecord]
    dims: dict[str, DimRange]
    extra: dict[str, Any] = field(default_factory=dict)  # static facts (layers, grid, image tokens, ...)

    def tensor(self, kind: str, name: str) -> TensorRecord | None:
        return next((t for t in getattr(self, kind) if t.name == name), None)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SpecRecord":
        """From GraphSpec.to_json() (the exporter's own output; a manifest's specs are checked in Manifest.from_json)."""
        def tensors(items: list[dict]) -> list[TensorRecord]:
            return [TensorRecord(t["name"], t["dtype"], tuple(t["shape"])) for t in items]

        return cls(tensors(data["inputs"]), tensors(data["outputs"]),
                   {n: DimRange(d["min"], d["opt"], d["max"]) for n, d in data["dims"].items()}, dict(data.get("extra", {})))

    def to_json(self) -> dict[str, Any]:
        def tensors(items: list[TensorRecord]) -> list[dict]:
            return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in items]

        return {"inputs": tensors(self.inputs), "outputs": tensors(self.outputs),
                "dims": {n: dataclasses.asdict(d) for n, d in self.dims.items()},
                **({"extra": self.extra} if self.extra else {})}


@dataclass
class GraphRecord:
    spec: SpecRecord
    weights_sha256: str  # identity of the graph's weights: a rebuild re-exports only graphs whose weights changed
    files: dict[str, GraphFile]  # by precision; fp32 always

    def served(self, precision: str) -> GraphFile:
        """The file the graph is served from at `precision`: fp32 where it has no typed one."""
        return self.files.get(precision) or self.files["fp32"]

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "weights_sha256": self.weights_sha256,
                "files": {p: f.to_json() for p, f in self.files.items()}}


@dataclass
class ModelRecord(_Flat):
    source: str  # folder path or "preset:NAME"
    fingerprint: str
    config: dict[str, Any]  # the model config as the reference wrote it (to_dict)
    image_size: int  # the side of a generated image
    latent_size: int
    latent_channels: int
    grid: int

    @property
    def max_positions(self) -> int:
        return self.config["language_config"]["max_position_embeddings"]

    @property
    def understanding_image_size(self) -> int:
        """The side the vision tower takes: its own image_size where the config gives one."""
        return self.config["vision_und_enc_config"]["params"].get("image_size", self.image_size)


@dataclass(frozen=True)
class Limits(_Flat):
    """Build-time ranges: the largest request the engines will accept."""

    max_batch: int = 16  # rows, i.e. 8 images under CFG
    max_seq: int = 4096  # prompt + generated tokens (capped by the model's max_position_embeddings)


@dataclass
class BackendRecord(_Flat):
    name: str
    reason: str


@dataclass
class CalibrationRecord(_Flat):
    """The INT8 calibration cache (read by builds only)."""

    file: str
    sha256: str
    calibrated: list[str]  # graphs calibrated by this build; the others took their ranges from the cache
    recipe: str  # the calibration recipe's key


@dataclass
class GateRecord(_Flat):
    """The INT8 end-to-end gate's verdict: graphs it kept fp32, and the checks it ran."""

    kept_fp32: list[str]
    ok: bool
    bounds: str
    steps: int
    new_tokens: int
    checks: dict[str, Any]
    failed_alone: dict[str, list[str]]


@dataclass
class Int8Record(_Flat):
    """The INT8 weight scheme and the CPU whose arithmetic it was checked on."""

    weight_max: int
    cpu: dict[str, Any]  # describe_cpu()'s record: machine, model, isa, flags
    arithmetic_rel_rms: float
    gate: GateRecord


@dataclass
class Manifest:
    created: str
    versions: dict[str, str]
    model: ModelRecord
    limits: Limits
    precisions: list[str]
    graphs: dict[str, GraphRecord]
    # A build's (`jfexport build`); an export folder (`jfexport export`) has none of these.
    backend: BackendRecord | None = None
    rebuilt: list[str] | None = None
    added: dict[str, list[str]] | None = None
    tokenizer: dict[str, str] | None = None  # file name -> sha256 (builds of a model with processor files)
    tokenizer_dir: str | None = None  # the folder, relative to the build folder, those files are in
    calibration: CalibrationRecord | None = None  # INT8 builds
    int8: Int8Record | None = None  # INT8 builds
    format: str = FORMAT

    @property
    def is_build(self) -> bool:
        return self.backend is not None

    @property
    def tokenizer_folder(self) -> str:
        """Where the runtime reads the tokenizer from (relative to the folder)."""
        return self.tokenizer_dir or TOKENIZER_DIR

    def paths(self) -> list[tuple[str, str]]:
        """(key path, path) of every file the manifest names, all graphs and precisions: what the runtime
        confines to the folder and a rebuild may reuse or remove."""
        out = []
        for graph, entry in self.graphs.items():
            for precision, info in entry.files.items():
                at = f"graphs.{graph}.files.{precision}"
                out.append((f"{at}.file", info.file))
                out += [(f"{at}.external_data[{i}]", e.file) for i, e in enumerate(info.external_data)]
                if info.engine is not None:
                    out.append((f"{at}.engine.file", info.engine.file))
        out += [(f"tokenizer.{name}", f"{self.tokenizer_folder}/{name}") for name in self.tokenizer or {}]
        if self.calibration is not None:
            out.append(("calibration.file", self.calibration.file))
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format, "created": self.created, "versions": dict(self.versions),
            "model": self.model.to_json(), "limits": self.limits.to_json(), "precisions": list(self.precisions),
            "graphs": {n: g.to_json() for n, g in self.graphs.items()},
        }
        for key in ("backend", "calibration", "int8"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).to_json()
        for key in ("rebuilt", "added", "tokenizer", "tokenizer_dir"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str | Path = MANIFEST) -> "Manifest":
        """The manifest `data` describes; EnginesError naming `source` and the key path of the first value the
        runtime cannot use, or the older format and the fix."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else None
            why = f" ({_OLD_FORMATS[got]})" if got in _OLD_FORMATS else ""
            folder = Path(source).parent
            raise EnginesError(f"{source}: format {got!r}, this runtime reads {FORMAT!r}{why}: rebuild the engines "
                               f"(`jfexport build --out {folder}`)")
        try:
            return _manifest(data)
        except _Invalid as e:
            raise EnginesError(f"{source}: {e}") from None

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        """The manifest of the build (or export) in `folder`, checked."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise EnginesError(f"{folder}: engines folder {what} (run `jfexport build --out {folder}`)")
        if not path.is_file():
            raise EnginesError(f"{folder}: no {MANIFEST}; not a finished build (run `jfexport build --out {folder}`)")
        data = read_json(path, EnginesError)
        return cls.from_json(data, path)

    def write(self, folder: Path, scratch: Path | None = None) -> None:
        """Replace `folder`'s manifest atomically and durably: readers see the old one or the new one, whole.

        The new manifest is written in `scratch` (a build's staging folder, on the same filesystem: a kill
        leaves it there, for the next build to remove with the staging folder), else in `folder`."""
        fd, tmp = tempfile.mkstemp(dir=scratch or folder, prefix=".manifest.", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a manifest is read by whoever serves the engines
            os.replace(tmp, folder / MANIFEST)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # Without this fsync a power cut could bring back the old directory entry after the new files' removal.
        fsync(folder)


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(folder: Path, name: str) -> FileRecord:
    """What the manifest records of the file `folder/name`, and the runtime checks before serving it."""
    path = folder / name
    return FileRecord(name, sha256_file(path), path.stat().st_size)


def versions() -> dict[str, str]:
    """The versions of the tools a build depends on: a rebuild with other versions reuses nothing."""
    out = {}
    for pkg in ("jfexport", "torch", "onnx", "onnxruntime", "transformers", "diffusers", "tensorrt"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


# --- reading: a small walker of expected types ---------------------------------------------------------
# Rather than a schema library: the manifest is nested and partly open (model config, parity records,
# versions), and the cross-checks between its parts cannot be expressed as types.


class _Invalid(Exception):
    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        raise _Invalid(where, f"expected {expected}, got {_shown(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _get(parent: dict, key: str, where: str, optional: bool = False) -> Any:
    if key not in parent:
        if optional:
            return None
        raise _Invalid(_join(where, key), "missing")
    return parent[key]


def _checked(parent: dict, key: str, where: str, ok: Callable[[Any], bool], expected: str,
             optional: bool = False) -> Any:
    """`parent[key]` where `ok` holds for it; None for an optional key that is absent (or null)."""
    value = _get(parent, key, where, optional)
    if value is None and optional:
        return None
    _expect(ok(value), _join(where, key), expected, value)
    return value


@overload
def _obj(parent: dict, key: str, where: str, optional: Literal[False] = False) -> dict: ...
@overload
def _obj(parent: dict, key: str, where: str, optional: Literal[True]) -> dict | None: ...
def _obj(parent: dict, key: str, where: str, optional: bool = False) -> dict | None:
    return _checked(parent, key, where, lambda v: isinstance(v, dict), "an object", optional)


@overload
def _pos_int(parent: dict, key: str, where: str, optional: Literal[False] = False) -> int: ...
@overload
def _pos_int(parent: dict, key: str, where: str, optional: Literal[True]) -> int | None: ...
def _pos_int(parent: dict, key: str, where: str, optional: bool = False) -> int | None:
    return _checked(parent, key, where, lambda v: _is_int(v) and v > 0, "a positive int", optional)


@overload
def _nonneg_int(parent: dict, key: str, where: str, optional: Literal[False] = False) -> int: ...
@overload
def _nonneg_int(parent: dict, key: str, where: str, optional: Literal[True]) -> int | None: ...
def _nonneg_int(parent: dict, key: str, where: str, optional: bool = False) -> int | None:
    return _checked(parent, key, where, lambda v: _is_int(v) and v >= 0, "an int >= 0", optional)


@overload
def _number(parent: dict, key: str, where: str, optional: Literal[False] = False) -> float: ...
@overload
def _number(parent: dict, key: str, where: str, optional: Literal[True]) -> float | None: ...
def _number(parent: dict, key: str, where: str, optional: bool = False) -> float | None:
    return _checked(parent, key, where, lambda v: (_is_int(v) or isinstance(v, float)) and v >= 0, "a number >= 0",
                    optional)


def _text(parent: dict, key: str, where: str, choices: tuple[str, ...] | None = None) -> str:
    if choices:
        return _checked(parent, key, where, lambda v: v in choices, f"one of {', '.join(choices)}")
    return _checked(parent, key, where, lambda v: isinstance(v, str) and v != "", "a non-empty string")


def _any_text(parent: dict, key: str, where: str) -> str:
    return _checked(parent, key, where, lambda v: isinstance(v, str), "a string")


@overload
def _list(parent: dict, key: str, where: str, optional: Literal[False] = False) -> list: ...
@overload
def _list(parent: dict, key: str, where: str, optional: Literal[True]) -> list | None: ...
def _list(parent: dict, key: str, where: str, optional: bool = False) -> list | None:
    return _checked(parent, key, where, lambda v: isinstance(v, list), "a list", optional)


def _graph_names(parent: dict, key: str, where: str) -> list[str]:
    names = _list(parent, key, where)
    for i, name in enumerate(names):
        _expect(name in GRAPH_NAMES, f"{_join(where, key)}[{i}]", "a graph of the contract", name)
    return names


def _sha(parent: dict, key: str, where: str) -> str:
    digest = _get(parent, key, where)
    _expect(isinstance(digest, str) and _SHA256.fullmatch(digest) is not None, _join(where, key),
            "64 lowercase hex digits", digest)
    return digest


def _plain_name(value: Any) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value \
        and "\0" not in value


def _file_record(parent: Any, where: str) -> FileRecord:
    """{file, sha256, size?}: a file a graph is served from, as the build recorded it."""
    _expect(isinstance(parent, dict), where, "an object", parent)
    return FileRecord(_text(parent, "file", where), _sha(parent, "sha256", where), _nonneg_int(parent, "size", where,
                                                                                               optional=True))


def _engine(parent: dict, where: str) -> EngineRecord:
    return EngineRecord(_text(parent, "file", where), _sha(parent, "sha256", where), _text(parent, "tensorrt", where),
                        _text(parent, "compute_capability", where), _sha(parent, "onnx_sha256", where),
                        _pos_int(parent, "profiles", where))


def _tensor(t: Any, where: str, dims: dict) -> TensorRecord:
    _expect(isinstance(t, dict), where, "an object", t)
    name = _text(t, "name", where)
    dtype = _text(t, "dtype", where, DTYPES)
    shape = _list(t, "shape", where)
    _expect(len(shape) > 0, _join(where, "shape"), "a non-empty list", shape)
    for i, d in enumerate(shape):
        at = f"{where}.shape[{i}]"
        if isinstance(d, str):
            parts = [p.strip() for p in d.split("+")]
            unknown = [p for p in parts if p not in dims]
            _expect(not unknown, at, f"a positive int or a sum of dims in {sorted(dims)}", d)
        else:
            _expect(_is_int(d) and d > 0, at, "a positive int or a dim name", d)
    return TensorRecord(name, dtype, tuple(shape))


def _spec(entry: dict, where: str) -> SpecRecord:
    spec = _obj(entry, "spec", where)
    where = f"{where}.spec"
    dims = {}
    for dim, r in _obj(spec, "dims", where).items():
        at = f"{where}.dims.{dim}"
        _expect(isinstance(r, dict), at, "an object", r)
        lo, opt, hi = _nonneg_int(r, "min", at), _nonneg_int(r, "opt", at), _pos_int(r, "max", at)
        _expect(lo <= opt <= hi, at, "min <= opt <= max", f"{lo} / {opt} / {hi}")
        dims[dim] = DimRange(lo, opt, hi)
    tensors = {}
    for kind in ("inputs", "outputs"):
        items = _list(spec, kind, where)
        _expect(len(items) > 0, f"{where}.{kind}", "a non-empty list", items)
        tensors[kind] = [_tensor(t, f"{where}.{kind}[{i}]", dims) for i, t in enumerate(items)]
    extra = _obj(spec, "extra", where, optional=True)
    return SpecRecord(tensors["inputs"], tensors["outputs"], dims, dict(extra or {}))


def _graph_file(info: Any, at: str) -> GraphFile:
    _expect(isinstance(info, dict), at, "an object", info)
    record = _file_record(info, at)
    size = _nonneg_int(info, "size", at)  # optional for engines and the calibration cache, not for graph files
    external = [_file_record(e, f"{at}.external_data[{i}]") for i, e in enumerate(_list(info, "external_data", at))]
    parity = _obj(info, "parity", at)
    layers = _list(info, "layers", at, optional=True)
    engine = _obj(info, "engine", at, optional=True)
    return GraphFile(record.file, record.sha256, size, external, parity,
                     _number(info, "export_seconds", at, optional=True), _number(info, "peak_rss_gib", at, optional=True),
                     layers, _engine(engine, f"{at}.engine") if engine is not None else None)


def _graph(name: str, entry: Any, precisions: list[str]) -> GraphRecord:
    where = f"graphs.{name}"
    _expect(isinstance(entry, dict), where, "an object", entry)
    spec = _spec(entry, where)
    weights = _sha(entry, "weights_sha256", where)
    files = _obj(entry, "files", where)
    _expect("fp32" in files, f"{where}.files", "an fp32 entry (every build exports fp32)", sorted(files))
    out = {}
    for precision, info in files.items():
        at = f"{where}.files.{precision}"
        _expect(precision in precisions, at, f"a precision the build lists ({', '.join(precisions)})", precision)
        out[precision] = _graph_file(info, at)
    return GraphRecord(spec, weights, out)


def _model(m: dict) -> ModelRecord:
    model = _obj(m, "model", "")
    config = _obj(model, "config", "model")
    language = _obj(config, "language_config", "model.config")
    _pos_int(language, "max_position_embeddings", "model.config.language_config")
    und = _obj(config, "vision_und_enc_config", "model.config")
    params = _obj(und, "params", "model.config.vision_und_enc_config")
    _pos_int(params, "image_size", "model.config.vision_und_enc_config.params", optional=True)
    sizes = {key: _pos_int(model, key, "model") for key in ("image_size", "latent_size", "latent_channels", "grid")}
    return ModelRecord(_any_text(model, "source", "model"), _text(model, "fingerprint", "model"), config, **sizes)


def _int8(m: dict) -> Int8Record:
    int8 = _obj(m, "int8", "")
    weight_max = _pos_int(int8, "weight_max", "int8")
    _expect(weight_max <= 127, "int8.weight_max", "an int in 1..127", weight_max)
    cpu = _obj(int8, "cpu", "int8")
    for key in ("machine", "model", "isa"):
        _text(cpu, key, "int8.cpu")
    gate = _obj(int8, "gate", "int8")
    ok = _get(gate, "ok", "int8.gate")
    _expect(isinstance(ok, bool), "int8.gate.ok", "true or false", ok)
    alone = _obj(gate, "failed_alone", "int8.gate")
    record = GateRecord(_graph_names(gate, "kept_fp32", "int8.gate"), ok, _text(gate, "bounds", "int8.gate"),
                        _pos_int(gate, "steps", "int8.gate"), _pos_int(gate, "new_tokens", "int8.gate"),
                        _obj(gate, "checks", "int8.gate"), {g: _list(alone, g, "int8.gate.failed_alone") for g in alone})
    return Int8Record(weight_max, cpu, _number(int8, "arithmetic_rel_rms", "int8"), record)


def _calibration(m: dict) -> CalibrationRecord:
    calibration = _obj(m, "calibration", "")
    record = _file_record(calibration, "calibration")
    return CalibrationRecord(record.file, record.sha256, _graph_names(calibration, "calibrated", "calibration"),
                             _text(calibration, "recipe", "calibration"))


def _tokenizer(m: dict) -> tuple[dict[str, str] | None, str | None]:
    tokenizer = _obj(m, "tokenizer", "", optional=True)  # file name -> sha256; absent where the model has none
    for name, digest in (tokenizer or {}).items():
        _expect(_plain_name(name), f"tokenizer.{name}", "a file name (no folder)", name)
        _expect(isinstance(digest, str) and _SHA256.fullmatch(digest) is not None, f"tokenizer.{name}",
                "64 lowercase hex digits", digest)
    where = m.get("tokenizer_dir")
    if where is not None or tokenizer is not None:
        _expect(_plain_name(where), "tokenizer_dir", "a folder name (no '/' or '..')", where)
    return tokenizer, where


def _manifest(m: dict) -> Manifest:
    model = _model(m)
    limits_json = _obj(m, "limits", "")
    limits = Limits(_pos_int(limits_json, "max_batch", "limits"), _pos_int(limits_json, "max_seq", "limits"))
    precisions = _list(m, "precisions", "")
    for i, p in enumerate(precisions):
        _expect(p in PRECISIONS, f"precisions[{i}]", f"one of {', '.join(PRECISIONS)}", p)
    _expect("fp32" in precisions, "precisions", "a list containing fp32", precisions)
    versions_ = _obj(m, "versions", "")
    for name, version in versions_.items():
        _expect(isinstance(version, str), f"versions.{name}", "a version string", version)
    backend = _obj(m, "backend", "", optional=True)
    tokenizer, tokenizer_dir = _tokenizer(m)
    graphs = _obj(m, "graphs", "")
    _expect(len(graphs) > 0, "graphs", "at least one graph", graphs)
    for name in graphs:
        _expect(name in GRAPH_NAMES, f"graphs.{name}", f"a graph of the contract ({', '.join(GRAPH_NAMES)})", name)
    manifest = Manifest(_any_text(m, "created", ""), versions_, model, limits, precisions,
                        {name: _graph(name, entry, precisions) for name, entry in graphs.items()},
                        tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)
    if backend is not None:  # a build: what it rebuilt and added, and the INT8 records where it made INT8 files
        manifest.backend = BackendRecord(_text(backend, "name", "backend", BACKENDS), _any_text(backend, "reason", "backend"))
        manifest.rebuilt = _graph_names(m, "rebuilt", "")
        added = _obj(m, "added", "")
        for name in added:
            _expect(name in manifest.graphs, f"added.{name}", "a graph of this build", name)
        manifest.added = {name: _list(added, name, "added") for name in added}
    if "int8" in precisions or "calibration" in m or "int8" in m:
        manifest.calibration, manifest.int8 = _calibration(m), _int8(m)
    _cross_checks(manifest)
    _limit_checks(manifest)
    return manifest


def _tensor_shape(manifest: Manifest, graph: str, kind: str, tensor: str) -> tuple[int | str, ...] | None:
    entry = manifest.graphs.get(graph)
    if entry is None:
        return None
    for i, t in enumerate(getattr(entry.spec, kind)):
        if t.name == tensor:
            # The checks below read up to 4 dims (B, C, H, W); 2 for token sequences (B, N).
            rank = 2 if tensor in ("z_embeds", "image_embeds") else 4
            _expect(len(t.shape) >= rank, f"graphs.{graph}.spec.{kind}[{i}].shape", f"at least {rank} dims",
                    list(t.shape))
            return t.shape
    raise _Invalid(f"graphs.{graph}.spec.{kind}", f"no tensor {tensor!r} (the graph contract names it)")


def _present_shape(manifest: Manifest, graph: str, kind: str, tensor: str) -> tuple[int | str, ...]:
    """`_tensor_shape` of a graph the caller knows the manifest lists."""
    shape = _tensor_shape(manifest, graph, kind, tensor)
    if shape is None:
        raise _Invalid(f"graphs.{graph}", "missing")
    return shape


def _extra(manifest: Manifest, graph: str, keys: tuple[str, ...]) -> dict:
    where = f"graphs.{graph}.spec"
    extra = manifest.graphs[graph].spec.extra
    if not extra:
        raise _Invalid(f"{where}.extra", "missing")
    for key in keys:
        _pos_int(extra, key, f"{where}.extra")
    return extra


def _same(where: str, value: int, other: str, other_value: Any) -> None:
    if value != other_value:
        raise _Invalid(where, f"{value} does not match {other} ({other_value})")


def _cross_checks(manifest: Manifest) -> None:
    """Facts stated twice (model section, graph specs) must agree: the runtime sizes its tensors by the
    model section, and a graph rejects any other size with an ONNX Runtime shape error mid-request."""
    model = manifest.model
    grid, latent, channels = model.grid, model.latent_size, model.latent_channels
    if "gen_encoder" in manifest.graphs:
        extra = _extra(manifest, "gen_encoder", ("grid", "latent"))
        _same("model.grid", grid, "graphs.gen_encoder.spec.extra.grid", extra["grid"])
        z = _present_shape(manifest, "gen_encoder", "outputs", "z_embeds")
        if z[1] != grid * grid:
            raise _Invalid("model.grid", f"{grid} ({grid * grid} image tokens) does not match graphs.gen_encoder "
                                         f"z_embeds shape[1] ({z[1]} image tokens)")
    for graph, kind, tensor in (("gen_encoder", "inputs", "latents"), ("gen_decoder", "outputs", "velocity"),
                                ("vae_decoder", "inputs", "latents")):
        shape = _tensor_shape(manifest, graph, kind, tensor)
        if shape is not None:
            _same("model.latent_channels", channels, f"graphs.{graph} {tensor} shape[1]", shape[1])
            _same("model.latent_size", latent, f"graphs.{graph} {tensor} shape[2]", shape[2])
            _same("model.latent_size", latent, f"graphs.{graph} {tensor} shape[3]", shape[3])
    images = _tensor_shape(manifest, "vae_decoder", "outputs", "images")
    if images is not None:  # the side of a generated image, which the server states as the one `size`
        _same("model.image_size", model.image_size, "graphs.vae_decoder images shape[2]", images[2])
        _same("model.image_size", model.image_size, "graphs.vae_decoder images shape[3]", images[3])
    pixels = _tensor_shape(manifest, "vision_encoder", "inputs", "pixel_values")
    if pixels is not None:
        params = model.config["vision_und_enc_config"]["params"]
        # The runtime's image preprocessing takes the vision tower's own size first (as from_engines does).
        where = "model.config.vision_und_enc_config.params.image_size" if "image_size" in params else "model.image_size"
        size = model.understanding_image_size
        _same(where, size, "graphs.vision_encoder pixel_values shape[2]", pixels[2])
        _same(where, size, "graphs.vision_encoder pixel_values shape[3]", pixels[3])
        tokens = _extra(manifest, "vision_encoder", ("image_tokens",))["image_tokens"]
        embeds = _present_shape(manifest, "vision_encoder", "outputs", "image_embeds")
        if embeds[1] != tokens + 1:
            raise _Invalid("graphs.vision_encoder.spec.extra.image_tokens", f"{tokens} does not match image_embeds "
                                                                          f"shape[1] ({embeds[1]} = image tokens + 1)")
    if "llm_decode" in manifest.graphs:  # the runtime sizes its K/V cache by these
        _extra(manifest, "llm_decode", ("layers", "kv_heads", "head_dim"))


def _limit_checks(manifest: Manifest) -> None:
    """The limits the runtime admits requests by may not exceed what the model and the graphs support."""
    max_seq, max_batch = manifest.limits.max_seq, manifest.limits.max_batch
    positions = manifest.model.max_positions
    if max_seq > positions:
        raise _Invalid("limits.max_seq", f"{max_seq} exceeds what the model supports: "
                                         f"model.config.language_config.max_position_embeddings is {positions}")
    # A sequence of max_seq tokens is prefilled (S) or decoded against a past of max_seq - 1 (P).
    for graph, dim, offset in (("embed_tokens", "S", 0), ("llm_prefill", "S", 0), ("llm_decode", "P", 1)):
        entry = manifest.graphs.get(graph)
        r = entry.spec.dims.get(dim) if entry else None
        if r is not None and max_seq > r.max + offset:
            raise _Invalid("limits.max_seq", f"{max_seq} exceeds what the graphs support: "
                                             f"graphs.{graph}.spec.dims.{dim}.max is {r.max}")
    for graph, entry in manifest.graphs.items():
        r = entry.spec.dims.get("B")
        if r is not None and max_batch > r.max:
            raise _Invalid("limits.max_batch", f"{max_batch} exceeds what the graphs support: "
                                               f"graphs.{graph}.spec.dims.B.max is {r.max}")
