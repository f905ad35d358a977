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
  retired files that the live manifest no longer lists.
- The tokenizer goes the same way: a build that brings other tokenizer files places them in a
  fresh folder `tokenizer-<id>/`, recorded in the manifest (`tokenizer_dir`), so the manifest
  replace switches graphs and tokenizer together. The fixed path `tokenizer` that older builds
  wrote (and readers of the fixed path open) becomes a link to that folder, repointed in one
  rename just after the manifest; a link a killed build left at its predecessor's tokenizer is
  repointed by the next load or build (runtime/folder_files.py). The previous tokenizer folder
  is retired after the commit like any other file. A folder at `tokenizer/` (an older build's
  layout, or a copy that turned the link into a folder) is replaced by the link once its files,
  all the build's own, are retired; a file in it no build wrote stops the build, named.
- Never destructive. A build replaces or removes only files its folder's previous manifest
  lists (or a dead build's journal recorded as placed), and only files inside DIR reached through
  no link. Any other file in DIR is left alone: a name it holds is simply not used. A previous
  manifest that a runtime would refuse (an older format, a failed check, or a path out of the
  folder) is no previous build at all (export/build.py `previous_manifest`): nothing of it is
  reused, none of its files removed.
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
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from jfexport.core.errors import UserError
from jfexport.core.manifest import MANIFEST, TOKENIZER_DIR, Manifest, fsync, sha256_file

LOCK = ".jfexport.lock"
TOKENIZER_FOLDER = re.compile(r"tokenizer-[0-9a-f]{12}")  # where a build places its tokenizer files
STAGING_PATTERN = re.compile(r"\.jfexport-staging-(\d+)-([0-9a-f]{12})")
BUILD_SUBFOLDER = re.compile(r"build-[0-9a-f]{12}")
JOURNAL = "journal.json"
PREVIOUS = "previous"  # where builds before `tokenizer_dir` kept a replaced tokenizer file, inside staging
Progress = Callable[[str], None]


class BuildFolderError(UserError):
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
    # The commit replaces manifest.json: what cannot be replaced by a file is said now, not after the export.
    manifest = out / MANIFEST
    if manifest.is_dir() and not manifest.is_symlink():
        raise BuildFolderError(f"{manifest}: is a folder, where the build writes its manifest; move it away and build "
                               "again")


def listed_files(manifest: Manifest | None) -> set[str]:
    """Every path (relative to the folder) a manifest names: graphs, external data, engines, tokenizer, calibration."""
    if manifest is None:
        return set()
    return {name for _, name in manifest.paths()}


def _safe_rel(rel: object) -> bool:
    """A path a journal or manifest gives that names something inside the folder (no absolute path or `..`)."""
    return isinstance(rel, str) and rel != "" and not os.path.isabs(rel) and ".." not in Path(rel).parts


def _removable(folder: Path, rel: str) -> bool:
    """`folder/rel` is a file in the folder itself, reached through no link (`tokenizer/x` once `tokenizer` is
    the link to a new build's tokenizer folder is that build's file, not the retired one)."""
    if not _safe_rel(rel):
        return False
    path = folder / rel
    parents = [folder / Path(*Path(rel).parts[:i]) for i in range(1, len(Path(rel).parts))]
    return path.is_file() and not path.is_symlink() and not any(p.is_symlink() for p in parents)


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
        # Never through a link: the lock is truncated and written, and a link would hand that to its target.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        why = "it is a link, and a build's lock is a file of its own" if e.errno == errno.ELOOP else e.strerror
        raise BuildFolderError(f"{path}: cannot use it as the build lock ({why}); remove it and build again") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise BuildFolderError(f"{path}: cannot use it as the build lock (it is "
                                   f"{'not a regular file' if not stat.S_ISREG(info.st_mode) else 'a file with other names'}"
                                   ", and a build's lock is a file of its own); remove it and build again")
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
        journal = json.loads((staging / JOURNAL).read_text())
    except (OSError, ValueError, RecursionError):
        return {}  # killed before its journal was complete: it had placed nothing yet
    if not isinstance(journal, dict):
        return {}
    placed = journal.get("placed")
    return {"placed": {k: v for k, v in placed.items() if _safe_rel(k) and isinstance(v, str)}
            if isinstance(placed, dict) else {},
            **{key: [r for r in journal[key] if _safe_rel(r)] if isinstance(journal.get(key), list) else []
               for key in ("swapped", "retire")}}


def _undo(folder: Path, staging: Path, live: Manifest | None) -> None:
    """Take back what the build that owned `staging` placed in `folder`, given the live manifest."""
    journal = _read_journal(staging)
    keep = listed_files(live)
    live_tokenizer = (live.tokenizer if live is not None else None) or {}
    placed = journal.get("placed", {})
    for rel in journal.get("swapped", []):  # journals of builds before `tokenizer_dir`
        old = staging / PREVIOUS / rel
        # The live manifest records the new file's hash only if the commit happened.
        if old.is_file() and live_tokenizer.get(rel.split("/", 1)[-1]) != placed.get(rel):
            os.replace(old, folder / rel)
    for rel, sha in placed.items():
        target = folder / rel
        if rel not in keep and _removable(folder, rel) and sha256_file(target) == sha:
            target.unlink()
    for rel in journal.get("retire", []):
        if rel not in keep and _removable(folder, rel):
            (folder / rel).unlink()
    _remove_empty_subfolders(folder)


def _remove_empty_subfolders(folder: Path) -> None:
    for path in folder.iterdir():
        if (BUILD_SUBFOLDER.fullmatch(path.name) or TOKENIZER_FOLDER.fullmatch(path.name)) and not path.is_symlink() \
                and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def point_tokenizer_link(folder: Path, where: str) -> None:
    """Make `folder/tokenizer` a link to `where` in one rename (the link or nothing may be there, not a folder)."""
    tmp = folder / f".tokenizer-link-{secrets.token_hex(6)}"
    os.symlink(where, tmp)
    try:
        os.replace(tmp, folder / TOKENIZER_DIR)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(folder)  # the rename is durable


def _our_link(link: Path) -> bool:
    """`tokenizer` is a link a build made (to a `tokenizer-<id>` folder beside it)."""
    return link.is_symlink() and TOKENIZER_FOLDER.fullmatch(os.readlink(link)) is not None


def _repair_tokenizer_link(folder: Path, live: Manifest | None) -> None:
    """Point `tokenizer` at the live manifest's tokenizer folder where a killed build left it elsewhere."""
    where = live.tokenizer_dir if live is not None else None
    link = folder / TOKENIZER_DIR
    if where and (_our_link(link) or not os.path.lexists(link)) and not (link.is_symlink()
                                                                            and os.readlink(link) == where):
        point_tokenizer_link(folder, where)


class BuildFolder:
    """One build's session on DIR, opened by `open_build_folder`: its staging folder and its commit."""

    def __init__(self, folder: Path, previous: Manifest | None, progress: Progress) -> None:
        self.folder = folder
        self.previous = previous
        self.progress = progress
        self.id = secrets.token_hex(6)
        self.staging = folder / f".jfexport-staging-{os.getpid()}-{self.id}"
        self.staging.mkdir()
        self._placed: dict[str, str] = {}
        self._taken = listed_files(previous)
        self._fixed_files: list[str] | None = None  # files of a folder at `tokenizer` to retire for the link

    def _free(self, rel: str) -> bool:
        return rel not in self._taken and not os.path.lexists(self.folder / rel)

    def _journal(self, retire: list[str]) -> None:
        path = self.staging / JOURNAL
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"placed": self._placed, "retire": retire}))
        fsync(tmp)
        os.replace(tmp, path)
        fsync(self.staging)

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
            fsync(self.staging / name)
            os.rename(self.staging / name, target)
            self._taken.add(prefix + name)
        if prefix:
            fsync(self.folder / prefix)
        fsync(self.folder)
        return prefix

    def _holds(self, where: str, record: dict[str, str]) -> bool:
        return all((self.folder / where / name).is_file() and sha256_file(self.folder / where / name) == sha
                   for name, sha in record.items())

    def _plan_fixed_path(self, record: dict[str, str]) -> None:
        """What becomes of `tokenizer` at the commit: a link (made or repointed), after a folder there has its
        files retired. A file in that folder is the build's when a previous manifest lists it or it holds the
        bytes a build wrote under its name; any other file, or a link no build made, stops the build here."""
        fixed = self.folder / TOKENIZER_DIR
        self._fixed_files = []
        if not os.path.lexists(fixed) or _our_link(fixed):
            return
        if fixed.is_symlink() or not fixed.is_dir():
            raise BuildFolderError(f"{fixed}: not a tokenizer folder or link this folder's builds made; "
                                   "move it away or build into another folder")
        known = (self.previous.tokenizer if self.previous is not None else None) or {}
        for entry in sorted(fixed.iterdir()):
            rel = f"{TOKENIZER_DIR}/{entry.name}"
            ours = entry.is_file() and not entry.is_symlink() and (
                rel in self._taken or sha256_file(entry) in {known.get(entry.name), record.get(entry.name)})
            if not ours:
                raise BuildFolderError(f"{entry}: a tokenizer file this folder's builds did not write; "
                                       "move it away or build into another folder")
            self._fixed_files.append(rel)

    def stage_tokenizer(self, files: dict[str, Path]) -> tuple[dict[str, str] | None, str | None]:
        """Copy tokenizer files into staging and place them, as other files, in a fresh `tokenizer-<id>/`
        (kept where the live tokenizer folder holds the same files); returns the manifest's records of them:
        `tokenizer` (sha256 by name) and `tokenizer_dir` (both None without tokenizer files)."""
        staged = self.staging / TOKENIZER_DIR
        staged.mkdir()
        record = {}
        for name, src in files.items():
            shutil.copyfile(src, staged / name)
            record[name] = sha256_file(staged / name)
        if not record:
            return None, None
        previous = self.previous
        if previous is not None and previous.tokenizer == record and previous.tokenizer_dir is not None \
                and self._holds(previous.tokenizer_dir, record):
            fixed = self.folder / TOKENIZER_DIR
            if not (fixed.is_dir() and not fixed.is_symlink() and self._holds(TOKENIZER_DIR, record)):
                self._plan_fixed_path(record)  # else a copy of the same files, served as it is
            return record, previous.tokenizer_dir
        self._plan_fixed_path(record)
        where = f"tokenizer-{self.id}"
        while os.path.lexists(self.folder / where):
            where = f"tokenizer-{secrets.token_hex(6)}"
        for name, sha in record.items():
            self._placed[f"{where}/{name}"] = sha
        self._journal([])
        for name in record:
            fsync(staged / name)
        fsync(staged)
        os.rename(staged, self.folder / where)
        self._taken.update(f"{where}/{name}" for name in record)
        fsync(self.folder)
        return record, where

    def commit(self, manifest: Manifest) -> None:
        """Make `manifest` the folder's build: the atomic replace, the tokenizer link, then retire the old files."""
        retire = sorted(listed_files(self.previous) - listed_files(manifest))
        self._journal(retire)
        self.progress(f"commit: {len(self._placed)} new file(s) in place, replacing {MANIFEST}")
        manifest.write(self.folder, scratch=self.staging)
        self.previous = manifest  # from here on, recovery keeps the new build
        self.progress(f"committed: removing {len(retire)} file(s) of the previous build")
        _repair_tokenizer_link(self.folder, manifest)  # readers of the fixed path: the new tokenizer at once
        where, fixed = manifest.tokenizer_dir, self.folder / TOKENIZER_DIR
        for rel in retire:
            if _removable(self.folder, rel):
                (self.folder / rel).unlink()
        if where and self._fixed_files is not None and fixed.is_dir() and not fixed.is_symlink():
            # A folder at the fixed path holding the build's files only (checked before placing anything).
            for rel in self._fixed_files:
                if _removable(self.folder, rel):
                    (self.folder / rel).unlink()
            if not any(fixed.iterdir()):
                fixed.rmdir()
                point_tokenizer_link(self.folder, where)
        _remove_empty_subfolders(self.folder)


def _clean_leftovers(folder: Path, live: Manifest | None, own: Path, progress: Progress) -> None:
    """Under the lock: every staging folder but ours is a dead build's; undo it and remove it."""
    for path in sorted(folder.iterdir()):
        match = STAGING_PATTERN.fullmatch(path.name)
        if match is None or path == own or not path.is_dir():
            continue
        _undo(folder, path, live)
        shutil.rmtree(path)
        progress(f"{path}: removed the staging folder of an interrupted build (pid {match[1]})")
    _repair_tokenizer_link(folder, live)  # a build killed between its manifest and its tokenizer link


@contextmanager
def open_build_folder(out: Path, read_previous: Callable[[Path], Manifest | None],
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
