"""The package layout's import rules (docs/architecture.md), checked on the source: fast, and a new
import that breaks a rule fails here naming the file and the import.

- jfexport/core is model-free: nothing from reference, export, runtime or tools, no transformers or diffusers.
- runtime/ serves: it never imports tooling (tools, export) or the CLI; model code only in the torch
  path's modules, which serving from an engines folder never loads (test_scheduler checks that at run time).
- jfexport/tools and export/ may import anything but the CLI commands.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGES = {"jfexport.reference": REPO / "reference", "jfexport.export": REPO / "export",
            "jfexport.runtime": REPO / "runtime", "jfexport.core": REPO / "jfexport" / "core",
            "jfexport.tools": REPO / "jfexport" / "tools"}
# The torch backend and the fast executors run the PyTorch model itself; nothing else in runtime may.
TORCH_PATH = {"runtime/backends/torch_backend.py", "runtime/batching/torch_step.py", "runtime/batching/torch_generation.py",
              "runtime/batching/fast_chat.py", "runtime/batching/fast_prefill.py"}


def _module(path: Path) -> str:
    for package, folder in PACKAGES.items():
        if folder in path.parents:
            rel = path.relative_to(folder).with_suffix("")
            return ".".join([package, *rel.parts]).removesuffix(".__init__")
    raise AssertionError(path)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `path`, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
            # `from . import x`: x may be a module
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if not node.module]
    return found


def _violations(folder: Path, forbidden: tuple[str, ...], allowed_files: set[str] = frozenset()) -> list[str]:
    bad = []
    for path in sorted(folder.rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel in allowed_files:
            continue
        for line, module in _imports(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{rel}:{line} imports {module}")
    return bad


def test_core_is_model_free():
    assert not _violations(PACKAGES["jfexport.core"], ("jfexport.reference", "jfexport.export", "jfexport.runtime",
                                                       "jfexport.tools", "jfexport.commands", "jfexport.cli",
                                                       "transformers", "diffusers"))


def test_runtime_imports_no_tooling():
    assert not _violations(PACKAGES["jfexport.runtime"], ("jfexport.tools", "jfexport.export", "jfexport.commands",
                                                          "jfexport.cli"))


def test_runtime_enters_model_code_only_on_the_torch_path():
    assert not _violations(PACKAGES["jfexport.runtime"], ("jfexport.reference", "transformers", "diffusers"), TORCH_PATH)


def test_tooling_never_imports_the_cli():
    for package in ("jfexport.tools", "jfexport.export", "jfexport.reference"):
        assert not _violations(PACKAGES[package], ("jfexport.commands", "jfexport.cli")), package


def test_the_checker_sees_relative_imports():
    # A rule that cannot see `from ..x import y` would pass every file: resolve one by hand.
    lines = dict(_imports(REPO / "runtime" / "batching" / "scheduler.py"))
    assert "jfexport.runtime.errors" in lines.values()
