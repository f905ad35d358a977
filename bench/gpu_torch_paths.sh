#!/usr/bin/env bash
# The GPU benchmark of the torch paths, as run on a lent GPU machine (PyTorch + CUDA, no registry).
# Usage there, from the repo root: bash bench/gpu_torch_paths.sh OUTDIR [PRESET]
# Expects wheels in .whl/ (`bash bench/gpu_wheels.sh` here makes them: jfexport built from this
# tree, transformers and diffusers at the pinned versions, importlib_metadata; `run` with carry
# [".whl"]): the machine's own torch is used, everything else is installed into /tmp/site so the
# pinned library versions are the ones measured.
# One run: the CUDA tests (graph replay against eager and CPU, FP8 kernel against its emulation,
# the compiled step under graphs), then bench-torch with every change on and off at batch 1 and 4
# (official loop, prompt K/V, CUDA graph step, whole loop as one graph, the stages of one step
# against their floors; through the scheduler: engine path, fast executors eager and graphed,
# chunk 1 and 8, FP8 with its quality cost, the Euler step compiled). A failing CUDA test does
# not stop the benchmark (device time is scarce) but makes the script exit 1, and the JSON of
# that run must not be reported as the fast path's figures. On a CPU machine, `bash bench/gpu_torch_paths.sh OUT tiny` runs the
# same steps at the tiny preset (the CUDA tests skip).
set -uo pipefail
out=${1:?usage: gpu_torch_paths.sh OUTDIR [PRESET]}
preset=${2:-janusflow-1.3b}
py=${PYTHON:-python3}  # the interpreter with torch (PYTHON=.venv/bin/python on a dev machine)
case $py in */*) py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py") ;; esac  # the script leaves the repo root
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
repo=$(pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd /tmp  # the repo root's jfexport/ folder would shadow the installed package
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "no nvidia-smi: CPU run"
  "$py" -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
  nproc
} 2>&1 | tee "$out/device.txt"
# CUDA tests first: a broken CUDA path should not be benchmarked. The tests import each other as
# the `tests` package, so the folder is copied whole.
rm -rf /tmp/gpu_tests && mkdir -p /tmp/gpu_tests && cp -r "$repo/tests" /tmp/gpu_tests/tests && cp "$repo/setup.cfg" /tmp/gpu_tests/  # its pytest markers
tests="/tmp/gpu_tests/tests/test_runtime_torch.py /tmp/gpu_tests/tests/test_fast_paths.py"
echo "$py -m pytest -q -p no:cacheprovider -m gpu -rs $tests" | tee "$out/gpu_tests.txt"
(cd /tmp/gpu_tests && "$py" -m pytest -q -p no:cacheprovider -m gpu -rs $tests) 2>&1 | tee -a "$out/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
if [ "$preset" = tiny ]; then steps=(--steps 3 --runs 1 --warmup 1); else steps=(--steps 30 --runs 3 --warmup 1); fi
"$py" -m jfexport.cli bench-torch --preset "$preset" --batches 1,4 "${steps[@]}" --cfg 2.0 --max-new-tokens 64 \
  --chunk 8 --json "$out/$preset-torch-paths.json" 2>&1 | tee "$out/bench_log.txt"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc, bench-torch exit $bench_rc" | tee -a "$out/bench_log.txt"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
