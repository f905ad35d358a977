"""The writer's side of a build folder: one lock, one staging folder, manifest.json as the commit point.

Why this design (DESIGN.md "What a build folder guarantees"):

- All-or-nothing. The runtime reads only what `manifest.json` lists, so the manifest is the
  single commit point. Every new file of a build is written into a private staging folder
  inside DIR (same filesystem: placing a file is a rename). Before the commit, new files are
  moved to names that no file in DIR holds and no manifest lists: a file keeps its usual name
  (`llm_decode.onnx`) where that name is free, else it goes into a fresh `build-<id>/`
  subfolder with its external data, so the live build's files are never touched. Files are
  fsynced, then `manifest.json` is replaced atomically (os.replace, fsync of file and folder),
  and only then are the files the previous manifest listed and the new one does not removed.
  A crash before the replace leaves the old build intact, after it the new build complete.
- Recovery. Before it places anything, a build writes a journal into its staging folder:
  the files it is about to place (with their sha256) and the files it will retire. The next
  build of the folder reads the journals of dead builds: it removes placed files that the live
  manifest does not list (and only while their hash shows they are the ones placed), and
  retired files that the live manifest no longer lists. The tokenizer is the one file set the
  runtime reads at a fixed path (`tokenizer/`); where a new build brings a different
  tokenizer, the old files are kept in staging until the commit and put back by recovery when
  the commit did not happen.
- Never destructive. A build replaces or removes only files its folder's previous manifest
  lists (or a dead build's journal recorded as placed). Any other file in DIR is left alone:
  a name it holds is simply not used.
- Locking. `fcntl.flock` on `DIR/.jfexport.lock`: the kernel drops the lock when its holder
  dies, so a second build is refused with the holder's pid (written in the file), and a pid
  left in the file by a killed build is stale by construction and taken over with a message.
  Waiting was not chosen: a build takes minutes, and a second one would only redo the work.
- Staging names are `.jfexport-staging-<pid>-<id>`. Under the lock, every other folder of
  that pattern belongs to a dead build; nothing else in DIR is ever cleaned up.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from jfexport.reference.errors import JanusFlowError

from .manifest import MANIFEST, sha256_file, write_manifest

LOCK = ".jfexport.lock"
STAGING_PATTERN = re.compile(r"\.jfexport-staging-(\d+)-([0-9a-f]{12})")
BUILD_SUBFOLDER = re.compile(r"build-[0-9a-f]{12}")
JOURNAL = "journal.json"
PREVIOUS = "previous"  # where a replaced tokenizer file waits for the commit, inside staging
TOKENIZER_DIR = "tokenizer"
Progress = Callable[[str], None]


class BuildFolderError(JanusFlowError):
    pass


class BuildLockedError(BuildFolderError):
    pass


def check_output_folder(out: Path) -> None:
    """Create `out` if needed; a regular file or an unwritable folder is named before any work."""
    if out.exists() and not out.is_dir():
        raise BuildFolderError(f"{out}: output folder is not writable: it is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=out, prefix=".probe.").close()
    except OSError as e:
        raise BuildFolderError(f"{out}: output folder is not writable ({e.strerror})") from None


def listed_files(manifest: dict | None) -> set[str]:
    """Every path (relative to the folder) a manifest names: graphs, external data, engines, tokenizer, calibration."""
    if manifest is None:
        return set()
    names: set[str] = set()
    for entry in manifest.get("graphs", {}).values():
        for info in entry.get("files", {}).values():
            names.add(info["file"])
            # External data is listed by name, or (as the runtime also reads it) as a {file, sha256} record.
            names.update(e if isinstance(e, str) else e["file"] for e in info.get("external_data", []))
            if "engine" in info:
                names.add(info["engine"]["file"])
    names.update(f"{TOKENIZER_DIR}/{n}" for n in manifest.get("tokenizer", {}))
    if "calibration" in manifest:  # the INT8 calibration cache (export/quantize/cache.py)
        names.add(manifest["calibration"]["file"])
    return names


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def locked(folder: Path, progress: Progress) -> Iterator[None]:
    """Hold `folder`'s build lock; refuse when a live process holds it."""
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise BuildFolderError(f"{path}: cannot create the build lock ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BuildLockedError(f"{folder}: another build (pid {holder}) is writing this folder (lock {path}); "
                                   "wait for it to finish, or build into another folder") from None
        stale = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if stale and stale != str(os.getpid()):
            state = "no longer running" if not stale.isdigit() or not _pid_alive(int(stale)) else "not holding it"
            progress(f"{path}: taking over the lock left by pid {stale} ({state})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty lock file tells the next build nobody was interrupted
    finally:
        os.close(fd)  # closing releases the flock


def _read_journal(staging: Path) -> dict:
    try:
        return json.loads((staging / JOURNAL).read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # killed before its journal was complete: it had placed nothing yet


def _undo(folder: Path, staging: Path, live: dict | None) -> None:
    """Take back what the build that owned `staging` placed in `folder`, given the live manifest."""
    journal = _read_journal(staging)
    keep = listed_files(live)
    live_tokenizer = (live or {}).get("tokenizer", {})
    placed = journal.get("placed", {})
    for rel in journal.get("swapped", []):
        old = staging / PREVIOUS / rel
        # The live manifest records the new file's hash only if the commit happened.
        if old.is_file() and live_tokenizer.get(rel.split("/", 1)[1]) != placed.get(rel):
            os.replace(old, folder / rel)
    for rel, sha in placed.items():
        target = folder / rel
        if rel not in keep and target.is_file() and sha256_file(target) == sha:
            target.unlink()
    for rel in journal.get("retire", []):
        if rel not in keep and (folder / rel).is_file():
            (folder / rel).unlink()
    _remove_empty_subfolders(folder)


def _remove_empty_subfolders(folder: Path) -> None:
    for path in folder.iterdir():
        if BUILD_SUBFOLDER.fullmatch(path.name) and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


class BuildFolder:
    """One build's session on DIR, opened by `open_build_folder`: its staging folder and its commit."""

    def __init__(self, folder: Path, previous: dict | None, progress: Progress) -> None:
        self.folder = folder
        self.previous = previous
        self.progress = progress
        self.id = secrets.token_hex(6)
        self.staging = folder / f".jfexport-staging-{os.getpid()}-{self.id}"
        self.staging.mkdir()
        self._placed: dict[str, str] = {}
        self._swapped: list[str] = []
        self._taken = listed_files(previous)

    def _free(self, rel: str) -> bool:
        return rel not in self._taken and not os.path.lexists(self.folder / rel)

    def _journal(self, retire: list[str]) -> None:
        path = self.staging / JOURNAL
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"placed": self._placed, "swapped": self._swapped, "retire": retire}))
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(self.staging)

    def place(self, staged: list[str]) -> str:
        """Move staged files (names in the staging folder, e.g. a graph and its external data) into the
        folder together, at their own names if all are free, else in `build-<id>/`; returns the prefix used."""
        prefix = "" if all(self._free(n) for n in staged) else f"build-{self.id}/"
        for name in staged:
            self._placed[prefix + name] = sha256_file(self.staging / name)
        self._journal([])
        if prefix:
            (self.folder / prefix).mkdir(exist_ok=True)
        for name in staged:
            target = self.folder / prefix / name
            _fsync(self.staging / name)
            os.rename(self.staging / name, target)
            self._taken.add(prefix + name)
        if prefix:
            _fsync(self.folder / prefix)
        _fsync(self.folder)
        return prefix

    def stage_tokenizer(self, files: dict[str, Path]) -> dict[str, str]:
        """Copy tokenizer files into staging; returns their sha256 by name for the manifest.

        A tokenizer file already in DIR is replaced only when a previous build of DIR wrote it."""
        previous = self.previous or {}
        # Builds made before the manifest recorded the tokenizer wrote it all the same.
        legacy = "backend" in previous and "tokenizer" not in previous
        record = {}
        (self.staging / TOKENIZER_DIR).mkdir()
        for name, src in files.items():
            rel = f"{TOKENIZER_DIR}/{name}"
            staged = self.staging / rel
            shutil.copyfile(src, staged)
            record[name] = sha256_file(staged)
            live = self.folder / rel
            if not os.path.lexists(live):
                continue
            same = live.is_file() and sha256_file(live) == record[name]
            ours = live.is_file() and (legacy or rel in self._taken)
            if not (same or ours):
                raise BuildFolderError(f"{live}: a tokenizer file this folder's builds did not write; "
                                       "move it away or build into another folder")
        return record

    def commit(self, manifest: dict) -> None:
        """Make `manifest` the folder's build: tokenizer files, then the atomic replace, then retire the old files."""
        retire = sorted(listed_files(self.previous) - listed_files(manifest))
        changed = []
        for name, sha in manifest.get("tokenizer", {}).items():
            live = self.folder / TOKENIZER_DIR / name
            if not (live.is_file() and sha256_file(live) == sha):
                changed.append(f"{TOKENIZER_DIR}/{name}")
        self._swapped = [rel for rel in changed if (self.folder / rel).is_file()]
        for rel in changed:
            self._placed[rel] = manifest["tokenizer"][rel.split("/", 1)[1]]
        self._journal(retire)
        self.progress(f"commit: {len(self._placed)} new file(s) in place, replacing {MANIFEST}")
        if changed:
            (self.folder / TOKENIZER_DIR).mkdir(exist_ok=True)
            (self.staging / PREVIOUS / TOKENIZER_DIR).mkdir(parents=True)
        for rel in self._swapped:
            os.rename(self.folder / rel, self.staging / PREVIOUS / rel)
        for rel in changed:
            _fsync(self.staging / rel)
            os.rename(self.staging / rel, self.folder / rel)
        if changed:
            _fsync(self.folder / TOKENIZER_DIR)
        write_manifest(self.folder, manifest)
        self.previous = manifest  # from here on, recovery keeps the new build
        self.progress(f"committed: removing {len(retire)} file(s) of the previous build")
        for rel in retire:
            if (self.folder / rel).is_file():
                (self.folder / rel).unlink()
        _remove_empty_subfolders(self.folder)


def _clean_leftovers(folder: Path, live: dict | None, own: Path, progress: Progress) -> None:
    """Under the lock: every staging folder but ours is a dead build's; undo it and remove it."""
    for path in sorted(folder.iterdir()):
        match = STAGING_PATTERN.fullmatch(path.name)
        if match is None or path == own or not path.is_dir():
            continue
        _undo(folder, path, live)
        shutil.rmtree(path)
        progress(f"{path}: removed the staging folder of an interrupted build (pid {match[1]})")


@contextmanager
def open_build_folder(out: Path, read_previous: Callable[[Path], dict | None],
                      progress: Progress = lambda msg: None) -> Iterator[BuildFolder]:
    """Lock `out`, clean up after killed builds, and yield a session whose staging is removed at exit.

    On any failure before the commit, what the session placed is taken back."""
    check_output_folder(out)
    with locked(out, progress):
        session = BuildFolder(out, read_previous(out), progress)
        try:
            _clean_leftovers(out, session.previous, session.staging, progress)
            yield session
        finally:
            _undo(out, session.staging, session.previous)
            shutil.rmtree(session.staging, ignore_errors=True)


def named_os_error(out: Path, e: OSError) -> BuildFolderError:
    """A full disk or a vanished folder mid-build, named with the path at fault."""
    where = e.filename or out
    hint = "; the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    return BuildFolderError(f"{where}: cannot write the build ({e.strerror}{hint}); the folder keeps its previous build")


__all__ = ["BuildFolder", "BuildFolderError", "BuildLockedError", "check_output_folder", "listed_files",
           "named_os_error", "open_build_folder"]
