"""The files a build folder serves: confined to the folder, and checked against the manifest before use.

Confinement: every path the manifest names (graph files, external data, engines, tokenizer) and
everything in the tokenizer folder must resolve, symlinks followed, inside the folder. This is checked
for all of them before any of them is opened, so a manifest naming `/etc/passwd`,
`../other/x.onnx` or a symlink out of the folder is refused instead of read or run.

Content: each served file (and each tokenizer file the manifest hashes) is compared with the sha256
the manifest records for it, which refuses a flipped byte, a graph from another build of the same
architecture (other weights, same size) and two swapped files. Hashing costs: sha256 runs at 1.8-2.1
GB/s on one core of the 2-core development machine (SHA-NI, from the page cache, measured while
other work shared the cores), so the 20 GB full-size build costs about 10-11 s of one core on its
first start. Files are hashed in parallel threads (hashlib and file reads release the GIL): 2.07
GB/s with 2 threads against 1.81 GB/s one after the other here; with enough cores the largest file
bounds the wall time. Where the disk is slower than the hash, the engines read those bytes anyway,
so a first start pays about one extra read of every file. That is acceptable once, not on every
start of every replica, so:

- the first start hashes every served file and records a verified stamp per file (size, mtime_ns,
  ctime_ns, inode, device, sha256) in `.jfexport-verified.json` in the folder, or, where the folder
  is not writable, in `$XDG_CACHE_HOME/jfexport/verified/` (default `~/.cache`);
- later starts trust a file whose stat still equals its stamp and whose stamp's sha256 is the one
  the manifest records: one stat per file (microseconds). Any write to a file changes its ctime
  (which user space cannot set back), a copy or a rename of another file over it changes its inode,
  so none of the three refused cases passes the fast path; a size the manifest records is compared
  on every start;
- `verify_files=True` (`load_engines`, `check_build`; `jfexport verify` always) hashes everything
  again, stamps or not.

Stamps protect against accidents (damaged disks, copies from the wrong build, mixed-up files), not
against someone who can write the folder: they could rewrite the manifest as well.

The tokenizer: a build writes its tokenizer files into a folder at a fresh name
(`tokenizer-<id>/`, the manifest's `tokenizer_dir`), like any other file, so replacing
`manifest.json` switches graphs and tokenizer together, and the runtime reads the tokenizer from
the folder the manifest names. `tokenizer` (a fixed path) is a link to it that the build repoints
after the manifest, for people and other readers; the runtime neither reads nor repairs it, so a
build killed between the two renames leaves a folder that serves the new build whole. An export
folder records no tokenizer: its processor is looked for in `tokenizer/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from jfexport.core.manifest import EnginesError, Manifest, sha256_file

log = logging.getLogger(__name__)

STAMPS = ".jfexport-verified.json"


@dataclass(frozen=True)
class ListedFile:
    """One file the manifest names for a graph (or the tokenizer), with what the build recorded about it."""

    graph: str
    name: str  # as the manifest spells it, relative to the folder
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class FileCheck:
    file: ListedFile
    how: str  # "sha256" (hashed now) or "stamp" (stat equals a verified stamp)


def served_files(manifest: Manifest, graph: str, precision: str, backend: str) -> list[ListedFile]:
    """The files `backend` serves `graph` from at `precision` (the fp32 file where a graph has no typed one)."""
    entry = manifest.graphs[graph]
    info = entry.served(precision)
    if backend == "tensorrt":
        if info.engine is None:
            have = [p for p, i in entry.files.items() if i.engine is not None]
            raise EnginesError(f"{graph}: no TensorRT engine for {precision} in this build (engines: {have or 'none'}; "
                               "rebuild with --backend tensorrt)")
        return [ListedFile(graph, info.engine.file, info.engine.sha256)]
    return [ListedFile(graph, r.file, r.sha256, r.size) for r in (info.record, *info.external_data)]


def tokenizer_files(manifest: Manifest) -> list[ListedFile]:
    """The tokenizer files the manifest records hashes for, where the build placed them."""
    where = manifest.tokenizer_folder
    return [ListedFile("tokenizer", f"{where}/{name}", digest) for name, digest in (manifest.tokenizer or {}).items()]


def confine_manifest(folder: Path, manifest: Manifest) -> None:
    """Refuse (EnginesError naming the key path) a manifest any of whose paths leaves the folder."""
    confine(folder, "tokenizer_dir", manifest.tokenizer_folder)
    for where, name in manifest.paths():
        confine(folder, where, name)


def confine(folder: Path, graph: str, name: str) -> Path:
    """`folder/name` resolved, refused unless it stays inside the folder (no absolute path, `..` or symlink out)."""
    root = folder.resolve()
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise EnginesError(f"{graph}: the manifest names {name!r}, which is outside the engines folder {folder}: "
                           "only paths inside it are served")
    path = (root / name).resolve()
    if path == root or not path.is_relative_to(root):
        raise EnginesError(f"{graph}: {name!r} in {folder} resolves to {path}, outside the engines folder: "
                           "only files inside it are served")
    return path


def confine_tokenizer(folder: Path, manifest: Manifest) -> Path:
    """The tokenizer folder the manifest names, and every file in it, must resolve inside the build folder;
    returns it (where the tokenizer is read from)."""
    name = manifest.tokenizer_folder
    tokenizer = folder / name
    if tokenizer.exists() or tokenizer.is_symlink():  # missing files are named by the file check
        confine(folder, "tokenizer", name)
        for entry in sorted(tokenizer.iterdir()):
            confine(folder, "tokenizer", f"{name}/{entry.name}")
    return tokenizer


def _stamp(st: os.stat_result, sha256: str) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
            "device": st.st_dev, "sha256": sha256}


def _cache_file(folder: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    return base / "jfexport" / "verified" / f"{key}.json"


def _read_stamps(folder: Path) -> list[dict]:
    """The stamps recorded in the folder and in the user's cache (a folder made read-only later has both)."""
    sources = []
    for path in (folder / STAMPS, _cache_file(folder)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # no stamps yet, or a damaged stamp file: its files are hashed again
        if isinstance(data, dict):
            sources.append(data)
    return sources


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".stamps.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # concurrent starts each write a whole file; the last one wins
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_stamps(folder: Path, stamps: dict) -> Path | None:
    for path in (folder / STAMPS, _cache_file(folder)):
        try:
            _write_json(path, stamps)
            return path
        except OSError:
            continue
    log.warning("%s: cannot record verified stamps in the folder or under %s: the next start hashes every file again",
                folder, _cache_file(folder).parent)
    return None


def check_files(folder: Path, listed: list[ListedFile], full: bool = False) -> list[FileCheck]:
    """Refuse (EnginesError naming graph and file) any listed file that is outside the folder, missing or not
    the one the manifest records; `full` hashes every file even where a verified stamp matches."""
    paths = [confine(folder, f.graph, f.name) for f in listed]  # all confined before any is opened
    sources = _read_stamps(folder)
    checks: dict[int, FileCheck] = {}
    to_hash: list[tuple[int, os.stat_result]] = []
    for i, (f, path) in enumerate(zip(listed, paths)):
        try:
            st = path.stat()
        except OSError:
            st = None
        if st is None or not path.is_file():
            what = "missing" if st is None else "not a regular file (a folder, a FIFO, a device)"
            raise EnginesError(f"{folder / f.name}: listed in the manifest for {f.graph} but {what} "
                               "(rebuild the engines)")
        if f.size is not None and st.st_size != f.size:
            raise EnginesError(f"{f.graph}: {folder / f.name} does not match the manifest ({st.st_size} bytes, "
                               f"it records {f.size}): a damaged or foreign file (rebuild the engines)")
        if not full and any(src.get(f.name) == _stamp(st, f.sha256) for src in sources):
            checks[i] = FileCheck(f, "stamp")
        else:
            to_hash.append((i, st))
    if not to_hash:
        return [checks[i] for i in range(len(listed))]
    with ThreadPoolExecutor(max_workers=min(len(to_hash), os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda item: sha256_file(paths[item[0]]), to_hash))
    stamps = {k: v for src in reversed(sources) for k, v in src.items()}
    wrong = []
    for (i, st), digest in zip(to_hash, digests):
        f = listed[i]
        if digest == f.sha256:
            stamps[f.name] = _stamp(st, digest)
            checks[i] = FileCheck(f, "sha256")
        else:
            wrong.append((f, digest))
    _write_stamps(folder, stamps)  # the good files need not be hashed again once the bad one is replaced
    if wrong:
        f, digest = wrong[0]
        raise EnginesError(f"{f.graph}: {folder / f.name} does not match the manifest (sha256 {digest[:16]}..., "
                           f"manifest {f.sha256[:16]}...): a damaged file, a file from another build, or files "
                           "swapped; rebuild the engines")
    return [checks[i] for i in range(len(listed))]
