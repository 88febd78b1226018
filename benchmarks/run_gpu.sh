#!/usr/bin/env bash
# Everything a lent GPU should run, in one call (device tool: `bash benchmarks/run_gpu.sh`).
# Builds the extension against the machine's own torch (no downloads), runs the whole test suite
# with CUDA available, then every benchmark; logs and JSON land in $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -m pip install -q --no-build-isolation --no-deps -e . || python3 setup.py build_ext --inplace
} 2>&1 | tee "$out/setup.log"
python3 -m pytest -q -x tests 2>&1 | tee "$out/tests.log"
python3 benchmarks/bench_kernels.py --json "$out/kernels.json" 2>&1 | tee "$out/kernels.log"
python3 benchmarks/bench_generate.py --device cuda --dtype bfloat16 --json "$out/generate.json" 2>&1 | tee "$out/generate.log"
if [ -f benchmarks/bench_search.py ]; then
  for n in 16 64 256; do
    python3 benchmarks/bench_search.py --real-shapes --n "$n" --json "$out/search_n$n.json" 2>&1 | tee "$out/search_n$n.log"
  done
fi
