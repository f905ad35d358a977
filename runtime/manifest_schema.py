"""manifest.json: read it and check it against what the runtime relies on, before any graph file is opened.

A bad manifest must fail here, naming the key path (`manifest.json: limits.max_seq: expected a
positive int, got "x"`), not later as a KeyError, a TypeError in a length check or an ONNX Runtime
shape error in the middle of a request. The checker is a small walker of expected types rather
than a schema library: the manifest is nested and partly open (model config, parity records,
versions), and the runtime needs only a few keys of it plus cross-checks between them (grid,
latent size, image size and limits against the graph specs) that a type schema cannot express.

This module imports no model code (no torch, transformers, diffusers or reference modules).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jfexport.core.errors import UserError
from jfexport.core.graph_contract import GRAPH_NAMES

MANIFEST = "manifest.json"
# Format 2: `llm_decode` outputs only the new tokens' K/V (`new.*`) and the runtime writes them into its
# cache in place. Format 1 builds return past + new (`present.*`) from llm_decode: they are refused, not
# adapted, since serving them would bring back the per-token copy of the whole past.
FORMAT = "jfexport-manifest/2"
_OLD_FORMATS = {"jfexport-manifest/1": "its llm_decode returns past + new K/V (`present.*`), this runtime's "
                                       "returns only the new K/V (`new.*`) and updates its cache in place"}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
BACKENDS = ("onnxruntime", "tensorrt")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class EnginesError(UserError):
    """A build folder the runtime refuses to serve; the message names the file, graph or key at fault."""


def read_build_manifest(folder: str | Path) -> dict:
    """The parsed manifest of a finished build (format checked; `validate_manifest` checks the rest)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise EnginesError(f"{folder}: engines folder does not exist (run `jfexport build --out {folder}`)")
    if not path.is_file():
        raise EnginesError(f"{folder}: no {MANIFEST}; not a finished build (run `jfexport build --out {folder}`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EnginesError(f"{path}: not valid JSON ({e})") from None
    except (UnicodeDecodeError, RecursionError) as e:  # not UTF-8; nested deeper than the parser recurses
        raise EnginesError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        why = f" ({_OLD_FORMATS[got]})" if got in _OLD_FORMATS else ""
        raise EnginesError(f"{path}: format {got!r}, this runtime reads {FORMAT!r}{why}: rebuild the engines "
                           f"(`jfexport build --out {folder}`)")
    return manifest


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


def _obj(parent: Any, key: str, where: str, optional: bool = False) -> dict | None:
    value = _get(parent, key, where, optional)
    if value is None and optional:
        return None
    _expect(isinstance(value, dict), _join(where, key), "an object", value)
    return value


def _get(parent: dict, key: str, where: str, optional: bool = False) -> Any:
    if key not in parent:
        if optional:
            return None
        raise _Invalid(_join(where, key), "missing")
    return parent[key]


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _pos_int(parent: dict, key: str, where: str, optional: bool = False) -> int | None:
    value = _get(parent, key, where, optional)
    if value is None and optional:
        return None
    _expect(_is_int(value) and value > 0, _join(where, key), "a positive int", value)
    return value


def _nonneg_int(parent: dict, key: str, where: str, optional: bool = False) -> int | None:
    value = _get(parent, key, where, optional)
    if value is None and optional:
        return None
    _expect(_is_int(value) and value >= 0, _join(where, key), "an int >= 0", value)
    return value


def _text(parent: dict, key: str, where: str, choices: tuple[str, ...] | None = None) -> str:
    value = _get(parent, key, where)
    if choices:
        _expect(value in choices, _join(where, key), f"one of {', '.join(choices)}", value)
    else:
        _expect(isinstance(value, str) and value != "", _join(where, key), "a non-empty string", value)
    return value


def _list(parent: dict, key: str, where: str, optional: bool = False) -> list:
    value = _get(parent, key, where, optional)
    if value is None and optional:
        return []
    _expect(isinstance(value, list), _join(where, key), "a list", value)
    return value


def _plain_name(value: Any) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value \
        and "\0" not in value


def _file_record(parent: dict, where: str) -> None:
    """{file, sha256, size?}: a file a graph is served from, as the build recorded it."""
    _text(parent, "file", where)
    digest = _get(parent, "sha256", where)
    _expect(isinstance(digest, str) and _SHA256.fullmatch(digest) is not None, _join(where, "sha256"),
            "64 lowercase hex digits", digest)
    _nonneg_int(parent, "size", where, optional=True)


def _tensor(t: Any, where: str, dims: dict) -> None:
    _expect(isinstance(t, dict), where, "an object", t)
    _text(t, "name", where)
    _text(t, "dtype", where, DTYPES)
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


def _graph(name: str, entry: Any, precisions: list[str]) -> None:
    where = f"graphs.{name}"
    _expect(isinstance(entry, dict), where, "an object", entry)
    spec = _obj(entry, "spec", where)
    dims = _obj(spec, "dims", f"{where}.spec")
    for dim, r in dims.items():
        at = f"{where}.spec.dims.{dim}"
        _expect(isinstance(r, dict), at, "an object", r)
        lo, opt, hi = _nonneg_int(r, "min", at), _nonneg_int(r, "opt", at), _pos_int(r, "max", at)
        _expect(lo <= opt <= hi, at, "min <= opt <= max", f"{lo} / {opt} / {hi}")
    for kind in ("inputs", "outputs"):
        tensors = _list(spec, kind, f"{where}.spec")
        _expect(len(tensors) > 0, f"{where}.spec.{kind}", "a non-empty list", tensors)
        for i, t in enumerate(tensors):
            _tensor(t, f"{where}.spec.{kind}[{i}]", dims)
    _obj(spec, "extra", f"{where}.spec", optional=True)
    files = _obj(entry, "files", where)
    _expect("fp32" in files, f"{where}.files", "an fp32 entry (every build exports fp32)", sorted(files))
    for precision, info in files.items():
        at = f"{where}.files.{precision}"
        _expect(precision in precisions, at, f"a precision the build lists ({', '.join(precisions)})", precision)
        _expect(isinstance(info, dict), at, "an object", info)
        _file_record(info, at)
        for i, extra in enumerate(_list(info, "external_data", at, optional=True)):
            # Older exporters list external-data files by name only; newer ones record their hash too.
            if not isinstance(extra, str):
                _expect(isinstance(extra, dict), f"{at}.external_data[{i}]", "a file name or an object", extra)
                _file_record(extra, f"{at}.external_data[{i}]")
            else:
                _expect(extra != "", f"{at}.external_data[{i}]", "a non-empty file name", extra)
        engine = _obj(info, "engine", at, optional=True)
        if engine is not None:
            _file_record(engine, f"{at}.engine")


def _tensor_shape(manifest: dict, graph: str, kind: str, tensor: str) -> list | None:
    entry = manifest["graphs"].get(graph)
    if entry is None:
        return None
    for i, t in enumerate(entry["spec"][kind]):
        if t["name"] == tensor:
            # The checks below read up to 4 dims (B, C, H, W); 2 for token sequences (B, N).
            rank = 2 if tensor in ("z_embeds", "image_embeds") else 4
            _expect(len(t["shape"]) >= rank, f"graphs.{graph}.spec.{kind}[{i}].shape", f"at least {rank} dims",
                    t["shape"])
            return t["shape"]
    raise _Invalid(f"graphs.{graph}.spec.{kind}", f"no tensor {tensor!r} (the graph contract names it)")


def _extra(manifest: dict, graph: str, keys: tuple[str, ...]) -> dict:
    where = f"graphs.{graph}.spec"
    extra = _obj(manifest["graphs"][graph]["spec"], "extra", where)
    for key in keys:
        _pos_int(extra, key, f"{where}.extra")
    return extra


def _same(where: str, value: int, other: str, other_value: Any) -> None:
    if value != other_value:
        raise _Invalid(where, f"{value} does not match {other} ({other_value})")


def _cross_checks(manifest: dict, model: dict) -> None:
    """Facts stated twice (model section, graph specs) must agree: the runtime sizes its tensors by the
    model section, and a graph rejects any other size with an ONNX Runtime shape error mid-request."""
    grid, latent, channels = model["grid"], model["latent_size"], model["latent_channels"]
    if "gen_encoder" in manifest["graphs"]:
        extra = _extra(manifest, "gen_encoder", ("grid", "latent"))
        _same("model.grid", grid, "graphs.gen_encoder.spec.extra.grid", extra["grid"])
        z = _tensor_shape(manifest, "gen_encoder", "outputs", "z_embeds")
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
        _same("model.image_size", model["image_size"], "graphs.vae_decoder images shape[2]", images[2])
        _same("model.image_size", model["image_size"], "graphs.vae_decoder images shape[3]", images[3])
    pixels = _tensor_shape(manifest, "vision_encoder", "inputs", "pixel_values")
    if pixels is not None:
        params = model["config"]["vision_und_enc_config"]["params"]
        # The runtime's image preprocessing takes the vision tower's own size first (as from_engines does).
        where = "model.config.vision_und_enc_config.params.image_size" if "image_size" in params else "model.image_size"
        size = params.get("image_size", model["image_size"])
        _same(where, size, "graphs.vision_encoder pixel_values shape[2]", pixels[2])
        _same(where, size, "graphs.vision_encoder pixel_values shape[3]", pixels[3])
        tokens = _extra(manifest, "vision_encoder", ("image_tokens",))["image_tokens"]
        embeds = _tensor_shape(manifest, "vision_encoder", "outputs", "image_embeds")
        if embeds[1] != tokens + 1:
            raise _Invalid("graphs.vision_encoder.spec.extra.image_tokens", f"{tokens} does not match image_embeds "
                                                                          f"shape[1] ({embeds[1]} = image tokens + 1)")


def _limit_checks(manifest: dict, model: dict, limits: dict) -> None:
    """The limits the runtime admits requests by may not exceed what the model and the graphs support."""
    max_seq, max_batch = limits["max_seq"], limits["max_batch"]
    positions = model["config"]["language_config"]["max_position_embeddings"]
    if max_seq > positions:
        raise _Invalid("limits.max_seq", f"{max_seq} exceeds what the model supports: "
                                         f"model.config.language_config.max_position_embeddings is {positions}")
    # A sequence of max_seq tokens is prefilled (S) or decoded against a past of max_seq - 1 (P).
    bounds = (("embed_tokens", "S", 0), ("llm_prefill", "S", 0), ("llm_decode", "P", 1))
    for graph, dim, offset in bounds:
        entry = manifest["graphs"].get(graph)
        r = entry["spec"]["dims"].get(dim) if entry else None
        if r is not None and max_seq > r["max"] + offset:
            raise _Invalid("limits.max_seq", f"{max_seq} exceeds what the graphs support: "
                                             f"graphs.{graph}.spec.dims.{dim}.max is {r['max']}")
    for graph, entry in manifest["graphs"].items():
        r = entry["spec"]["dims"].get("B")
        if r is not None and max_batch > r["max"]:
            raise _Invalid("limits.max_batch", f"{max_batch} exceeds what the graphs support: "
                                               f"graphs.{graph}.spec.dims.B.max is {r['max']}")


def validate_manifest(manifest: dict, source: str | Path = MANIFEST) -> None:
    """Raise EnginesError naming `source` and the key path of the first value the runtime cannot use."""
    try:
        _validate(manifest)
    except _Invalid as e:
        raise EnginesError(f"{source}: {e}") from None


def _validate(m: dict) -> None:
    model = _obj(m, "model", "")
    config = _obj(model, "config", "model")
    language = _obj(config, "language_config", "model.config")
    _pos_int(language, "max_position_embeddings", "model.config.language_config")
    und = _obj(config, "vision_und_enc_config", "model.config")
    params = _obj(und, "params", "model.config.vision_und_enc_config")
    _pos_int(params, "image_size", "model.config.vision_und_enc_config.params", optional=True)
    for key in ("image_size", "latent_size", "latent_channels", "grid"):
        _pos_int(model, key, "model")
    _text(model, "fingerprint", "model")
    limits = _obj(m, "limits", "")
    _pos_int(limits, "max_batch", "limits")
    _pos_int(limits, "max_seq", "limits")
    precisions = _list(m, "precisions", "")
    for i, p in enumerate(precisions):
        _expect(p in PRECISIONS, f"precisions[{i}]", f"one of {', '.join(PRECISIONS)}", p)
    _expect("fp32" in precisions, "precisions", "a list containing fp32", precisions)
    backend = _obj(m, "backend", "", optional=True)
    if backend is not None:
        _text(backend, "name", "backend", BACKENDS)
    tokenizer = _obj(m, "tokenizer", "", optional=True)  # file name -> sha256; older builds did not record it
    for name, digest in (tokenizer or {}).items():
        _expect(_plain_name(name), f"tokenizer.{name}", "a file name (no folder)", name)
        _expect(isinstance(digest, str) and _SHA256.fullmatch(digest) is not None, f"tokenizer.{name}",
                "64 lowercase hex digits", digest)
    if "tokenizer_dir" in m:  # where the tokenizer files are; older builds: `tokenizer/`
        _expect(_plain_name(m["tokenizer_dir"]), "tokenizer_dir", "a folder name (no '/' or '..')", m["tokenizer_dir"])
    calibration = _obj(m, "calibration", "", optional=True)  # the INT8 calibration cache, read by builds only
    if calibration is not None:
        _file_record(calibration, "calibration")
    int8 = _obj(m, "int8", "", optional=True)  # the INT8 scheme and the CPU it was checked on; older builds: none
    if int8 is not None:
        weight_max = _pos_int(int8, "weight_max", "int8")
        _expect(weight_max is not None and weight_max <= 127, "int8.weight_max", "an int in 1..127", weight_max)
        cpu = _obj(int8, "cpu", "int8")
        for key in ("machine", "model", "isa"):
            _text(cpu, key, "int8.cpu")
        gate = _obj(int8, "gate", "int8", optional=True)
        for i, name in enumerate(_list(gate, "kept_fp32", "int8.gate") if gate is not None else []):
            _expect(name in GRAPH_NAMES, f"int8.gate.kept_fp32[{i}]", "a graph of the contract", name)
    graphs = _obj(m, "graphs", "")
    _expect(len(graphs) > 0, "graphs", "at least one graph", graphs)
    for name, entry in graphs.items():
        _expect(name in GRAPH_NAMES, f"graphs.{name}", f"a graph of the contract ({', '.join(GRAPH_NAMES)})", name)
        _graph(name, entry, precisions)
    _cross_checks(m, model)
    _limit_checks(m, model, limits)

