#!/usr/bin/env bash
# The GPU benchmark of the torch paths, as run on a lent GPU machine (PyTorch + CUDA, no registry).
# Usage there, from the repo root: bash bench/gpu_torch_paths.sh OUTDIR
# Expects wheels in .whl/ (jfexport built from this tree, transformers and diffusers at the pinned
# versions, importlib_metadata): the machine's own torch is used, everything else is installed
# into /tmp/site so the pinned library versions are the ones measured.
set -uo pipefail
out=${1:?usage: gpu_torch_paths.sh OUTDIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
repo=$(pwd)
out=$(cd "$out" && pwd)
cd /tmp  # the repo root's jfexport/ folder would shadow the installed package
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
  nproc
} 2>&1 | tee "$out/device.txt"
# CUDA-only tests first: a broken CUDA path should not be benchmarked.
mkdir -p /tmp/gpu_tests && cp "$repo/tests/conftest.py" "$repo/tests/test_runtime_torch.py" /tmp/gpu_tests/
python3 -m pytest -q -p no:cacheprovider /tmp/gpu_tests 2>&1 | tee "$out/gpu_tests.txt"
python3 -m jfexport.cli bench-torch --preset janusflow-1.3b --batches 1,4 --steps 30 --cfg 2.0 --warmup 1 --runs 3 \
  --json "$out/janusflow-1.3b-torch-paths.json" 2>&1 | tee "$out/bench_log.txt"
