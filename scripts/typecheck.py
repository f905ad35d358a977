"""Type-check jfexport under the module names it is installed with.

setup.cfg's package_dir installs the top-level folders reference/, export/ and runtime/ as
jfexport.reference, jfexport.export and jfexport.runtime. The editable install does that with an
import hook, which mypy cannot follow: checked from the repository as it is, every import of
jfexport.reference/export/runtime would be unresolved and silently typed Any. So mypy reads the
package through a tree of links laid out as installed (build/typecheck/jfexport, the
`mypy_path` in pyproject.toml), and the paths in its report are mapped back to the repository's
files. Options come from [tool.mypy] in pyproject.toml; extra arguments go to mypy.

    .venv/bin/python scripts/typecheck.py
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def package_dirs() -> dict[str, str]:
    """setup.cfg's package_dir: import name -> folder relative to the repository root."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    mapping: dict[str, str] = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, _, folder = line.partition("=")
        mapping[name.strip()] = folder.strip()
    return mapping


def build_tree(mapping: dict[str, str]) -> dict[str, str]:
    """Lay the packages out as installed; returns linked tree prefix -> repository prefix."""
    shutil.rmtree(TREE, ignore_errors=True)
    prefixes: dict[str, str] = {}
    # Parents first, so a sub-package's link lands inside its parent's directory.
    for name in sorted(mapping, key=lambda n: n.count(".")):
        folder = ROOT / mapping[name]
        target = TREE.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for entry in folder.iterdir():
            if entry.name == "__pycache__" or (target / entry.name).exists():
                continue
            os.symlink(entry, target / entry.name)
        prefixes[f"{target.relative_to(ROOT).as_posix()}/"] = f"{mapping[name]}/"
    return prefixes


def main() -> int:
    prefixes = build_tree(package_dirs())
    # Longest prefix first: jfexport/reference/ must win over jfexport/.
    ordered = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *sys.argv[1:]], cwd=ROOT, capture_output=True, text=True
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        for linked, real in ordered:
            if line.startswith(linked):
                line = real + line[len(linked):]
                break
        print(line)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
