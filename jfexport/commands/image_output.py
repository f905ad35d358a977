"""Where `generate` puts its PNG files: numbered after those already there, never overwritten unless asked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .output_files import OutputError, ensure_writable_folder, write_atomically

if TYPE_CHECKING:
    from PIL import Image

_IMAGE_NAME = re.compile(r"image_(\d+)\.png")


def plan_image_paths(out: Path, count: int, overwrite: bool) -> list[Path]:
    """The `count` paths the images will take in `out`, after checking that `out` can take them.

    Called before sampling, so a bad folder fails at once rather than after the last step. New
    images are numbered after the highest `image_<i>.png` already there; `overwrite` numbers
    from 0 and replaces.
    """
    ensure_writable_folder(out, "-o")
    existing = {int(m.group(1)): p for p in out.iterdir() if (m := _IMAGE_NAME.fullmatch(p.name))}
    in_the_way = sorted(p.name for p in existing.values() if not p.is_file())
    if in_the_way:
        raise OutputError(f"-o {out}: {', '.join(in_the_way)} exists and is not a file")
    first = 0 if overwrite else max(existing, default=-1) + 1
    return [out / f"image_{first + i}.png" for i in range(count)]


def write_png(image: Image.Image, path: Path, overwrite: bool, text: dict[str, str] | None = None) -> None:
    """`text`: PNG text chunks (keyword -> text), where image tools look for what made an image."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)  # iTXt: UTF-8, as prompts may be
    write_atomically(path, lambda f: image.save(f, format="PNG", pnginfo=info), replace=overwrite)


def png_bound(side: int, text: dict[str, str]) -> int:
    """The most bytes a side x side RGB PNG with `text` chunks takes: its raw rows (a filter byte each) stored
    uncompressed at worst, zlib's block headers, the chunks' own framing and the text."""
    raw = side * (3 * side + 1)
    return raw + 5 * (raw // 16384 + 1) + 4096 + sum(len(k.encode()) + len(v.encode()) + 32 for k, v in text.items())


def provenance(prompts: list[str], n: int, index: int, seed: int, steps: int, cfg: float, model: dict) -> dict[str, str]:
    """The text chunks of image `index` of a request: its prompt, and all a rerun needs to draw it again
    (the noise of image i is row i of the request's noise, so the request's prompts and n, not only its own)."""
    import json

    from jfexport import __version__

    record = {"prompt": prompts[index // n], "seed": seed, "steps": steps, "cfg": cfg, "index": index,
              "request": {"prompts": prompts, "n": n}, **model}
    return {"Description": prompts[index // n], "Software": f"jfexport {__version__}",
            "jfexport": json.dumps(record, ensure_ascii=False)}
