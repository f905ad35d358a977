"""README's commands, run as a reader runs them: every shell or Python block marked
`<!-- readme-test -->` in README.md's source, in README order, in a fresh folder holding only the
environment (`.venv`, what `bash scripts/setup.sh` made) and, to share one build with the other
tests, a copy of the bundled model's build where `jfexport build` puts it (the block's own
`jfexport build` must find it up to date). Blocks marked `server` talk to `jfexport serve` on
that build (the README's port replaced by a free one); `cwd=repo` blocks run in the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO, SHARED, shared_present
from .serve_helpers import running_server

MARKED = re.compile(r"^<!-- readme-test(?::\s*(?P<options>[^>]*?))?\s*-->\n```(?P<lang>\w+)\n(?P<body>.*?)^```$",
                    re.M | re.S)
# What the environment running these tests already did: the README's setup step.
SETUP = "bash scripts/setup.sh && "
README_PORT = "127.0.0.1:8000"


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    options: frozenset[str]
    body: str


def readme_blocks() -> list[Block]:
    text = (REPO / "README.md").read_text()
    return [Block(text.count("\n", 0, m.start()) + 1, m.group("lang"), frozenset((m.group("options") or "").split()),
                  m.group("body")) for m in MARKED.finditer(text)]


def test_the_marked_blocks_are_found():
    blocks = readme_blocks()
    assert sum(line.startswith("<!-- readme-test") for line in (REPO / "README.md").read_text().splitlines()) == len(blocks)
    assert {b.lang for b in blocks} <= {"sh", "python"}
    assert blocks[0].body.startswith(SETUP + ".venv/bin/jfexport build")  # the main job comes first
    assert any("server" in b.options for b in blocks) and any("cwd=repo" in b.options for b in blocks)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, default_build) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").symlink_to(Path(sys.prefix))
    shutil.copytree(default_build, folder / "engines" / "default", symlinks=True)
    return folder


def _run(block: Block, cwd: Path, port: int | None) -> subprocess.CompletedProcess:
    body = block.body.removeprefix(SETUP)
    if port is not None:
        assert README_PORT in body, f"README.md:{block.line}: a server block that names no {README_PORT}"
        body = body.replace(README_PORT, f"127.0.0.1:{port}")
    command = ["bash", "-euo", "pipefail", "-c", body] if block.lang == "sh" else [sys.executable, "-c", body]
    env = {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_marked_block_runs(folder, tmp_path):
    blocks = readme_blocks()
    if not shared_present(SHARED / "fixtures" / "official-A" / "manifest.json"):
        blocks = [b for b in blocks if "cwd=repo" not in b.options]
    local = [b for b in blocks if "server" not in b.options]
    served = [b for b in blocks if "server" in b.options]
    for block in local:
        res = _run(block, REPO if "cwd=repo" in block.options else folder, None)
        assert res.returncode == 0, f"README.md:{block.line} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    # The main job left what the later blocks read, and a chat answer about it.
    assert (folder / "out" / "image_0.png").is_file()
    with running_server(["--engines", str(folder / "engines" / "default")], tmp_path / "server.log") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        for block in served:
            res = _run(block, folder, port)
            assert res.returncode == 0, f"README.md:{block.line} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert (folder / "out" / "circle.png").is_file()
    # Nothing was written into the repository.
    assert not (REPO / "circle.png").exists()
