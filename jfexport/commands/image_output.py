"""Where `generate` writes its PNG files: checked before sampling, never overwritten unless asked."""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image

from jfexport.reference.errors import JanusFlowError

_IMAGE_NAME = re.compile(r"image_(\d+)\.png")


class OutputFolderError(JanusFlowError):
    """The `-o/--out` folder cannot take the images."""


def plan_image_paths(out: Path, count: int, overwrite: bool) -> list[Path]:
    """The `count` paths the images will take in `out`, after checking that `out` can take them.

    Called before sampling, so a bad folder fails at once rather than after the last step. New
    images are numbered after the highest `image_<i>.png` already there; `overwrite` numbers
    from 0 and replaces.
    """
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"-o {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Creating a file is the only test that holds for root, whom permission bits do not stop
        # (a read-only mount or an immutable folder does); os.access would answer for the bits.
        probe = out / f".jfexport-probe.{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as e:
        raise OutputFolderError(f"-o {out}: cannot write there ({e.strerror})") from None
    existing = {int(m.group(1)): p for p in out.iterdir() if (m := _IMAGE_NAME.fullmatch(p.name))}
    in_the_way = sorted(p.name for p in existing.values() if not p.is_file())
    if in_the_way:
        raise OutputFolderError(f"-o {out}: {', '.join(in_the_way)} exists and is not a file")
    first = 0 if overwrite else max(existing, default=-1) + 1
    return [out / f"image_{first + i}.png" for i in range(count)]


def write_png(image: Image.Image, path: Path, overwrite: bool) -> None:
    """Write under a temporary name, then move into place, so no half-written PNG carries `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # 0o666 minus the umask, as any other file the user creates (mkstemp would force 0o600).
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            image.save(f, format="PNG")
        if overwrite:
            os.replace(tmp, path)
        else:
            # A hard link fails when `path` exists, where a rename would replace a file that
            # appeared while sampling.
            os.link(tmp, path)
    except FileExistsError:
        raise OutputFolderError(f"{path}: appeared while sampling; not overwritten (pass --overwrite)") from None
    except OSError as e:
        raise OutputFolderError(f"{path}: cannot write the image ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
