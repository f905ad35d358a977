"""Files the CLI writes: the destination is checked before the work, the file written atomically after."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import click

from jfexport.core.errors import UserError


class OutputError(UserError):
    """An output option names a place the command cannot write."""


def say(text: str = "", nl: bool = True) -> None:
    """A command's result on standard output. A write that fails (a full disk, a reader that closed the
    pipe) is named like any other output's, rather than a traceback; what is left unwritten is dropped,
    or the interpreter's exit would fail on it again."""
    try:
        click.echo(text, nl=nl)
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OutputError(f"cannot write to standard output ({e.strerror or e})") from None


@contextmanager
def removed_if_left_empty(*folders: Path) -> Iterator[None]:
    """The folders a command may create for its output: where it fails (a refused prompt, a build at
    fault, Ctrl-C), those it created and left empty are removed, so that a refused command leaves
    nothing behind. A folder that existed, or holds anything, stays."""
    chains = []
    for folder in folders:
        missing, f = [], folder.absolute()
        while not f.exists() and f != f.parent:  # the folder and its missing parents, deepest first
            missing.append(f)
            f = f.parent
        chains.append(missing)
    try:
        yield
    except BaseException:
        for missing in chains:
            for f in missing:
                try:
                    f.rmdir()
                except OSError:  # not empty (or not ours to remove): it and its parents stay
                    break
        raise


def check_room(folder: Path, need: int, option: str) -> None:
    """Refuse, before the work, a `folder` whose file system has fewer than `need` bytes free (the most the
    outputs can take): a probe file proves the folder writable, not that the results will fit."""
    try:
        stats = os.statvfs(folder)
    except OSError:  # no statvfs here: the write itself will say
        return
    free = stats.f_bavail * stats.f_frsize
    if free < need:
        raise OutputError(f"{option}: {folder} has {_size(free)} free, the images need up to {_size(need)}: free some "
                          "space or write them elsewhere")


def _size(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB" if count >= 1 << 20 else f"{count / 1024:.1f} KiB"


def ensure_writable_folder(folder: Path, option: str) -> None:
    """Create `folder` if needed and prove a file can be created in it; `option` names the culprit."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option}: {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Creating a file is the only test that holds for root, whom permission bits do not stop
        # (a read-only mount or an immutable folder does); os.access would answer for the bits.
        probe = folder / f".jfexport-probe.{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{option}: cannot write in {folder} ({e.strerror})") from None


def write_atomically(path: Path, write: Callable[[BinaryIO], object], replace: bool) -> None:
    """Write under a temporary name, then move into place, so no half-written file carries `path`.

    Without `replace` an existing `path` is never touched: a hard link fails where a rename
    would replace a file that appeared while the command worked.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # 0o666 minus the umask, as any other file the user creates (mkstemp would force 0o600).
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path}: appeared meanwhile; not overwritten") from None
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)


def check_json_target(path: Path | None) -> None:
    """Fail before a long measurement, not after it, when `--json` cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise OutputError(f"--json {path}: is a folder")
    ensure_writable_folder(path.parent, f"--json {path}")


def write_json(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode() + b"\n"), replace=True)
