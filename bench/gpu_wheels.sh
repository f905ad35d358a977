#!/usr/bin/env bash
# Wheels for the lent GPU machine (Python 3.12, its own torch, no registry), into .whl/ at the repo
# root, run here where pip reaches PyPI: jfexport built from this tree, and the pinned versions of
# the libraries the CUDA tests and bench-torch import that the machine's image lacks or holds at
# other versions. Then, on the device: `run` with carry [".whl"] and
#   bash bench/gpu_torch_paths.sh "$OUT"   (it installs .whl/ into /tmp/site first)
set -euo pipefail
py=${PYTHON:-python3}
pin() { grep -E "^$1==" constraints.txt; }  # the versions CI tests with
rm -rf .whl && mkdir .whl
"$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  "$(pin transformers)" "$(pin diffusers)" "importlib_metadata==$("$py" -c 'import importlib.metadata as m; print(m.version("importlib_metadata"))')"
ls -l .whl
du -sh .whl  # the working tree travels with at most 64 MiB
