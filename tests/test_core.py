"""jfexport.core is model-free: reference, export and runtime import it, it imports none of them."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "diffusers", "onnx", "onnxruntime", "jfexport.runtime", "jfexport.export",
             "jfexport.reference.modules")


def test_the_core_imports_no_model_code_runtime_or_exporter():
    code = """
import sys
import jfexport.core.manifest
print("LOADED", sorted(sys.modules))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = eval(res.stdout.split("LOADED", 1)[1])
    bad = sorted(m for m in loaded if any(m == r or m.startswith(r + ".") for r in FORBIDDEN))
    assert "jfexport.core.manifest" in loaded and bad == [], bad
