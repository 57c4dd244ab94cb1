#!/usr/bin/env bash
# For a GPU machine with torch preinstalled and no network: build in place, run the whole test suite (GPU tests
# included), compute-sanitizer over the CUDA kernels' tests, and the benchmarks. Results go to $OUT (default
# benchmarks/results). Every step runs even if an earlier one fails; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
status=0
step() { echo "=== $*"; "$@" || { echo "=== FAILED: $*"; status=1; }; }

step env MAX_JOBS="$(nproc)" pip install --no-build-isolation --no-deps -e .
step python -m fastcnn.info
step python -m pytest -q -p no:cacheprovider tests --junitxml="$out/gpu_tests.xml"
# The Triton kernel tests also run once under the interpreter, as CI runs them.
step env TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/ops/test_triton_kernels.py
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step compute-sanitizer --tool "$tool" --error-exitcode 1 python -m pytest -q -p no:cacheprovider -x \
      tests/ops/test_conv_relu_pool.py -k "cuda and not compile"
  done
fi
step python benchmarks/bench_conv_block.py --device cuda --out "$out"
step python benchmarks/bench_conv_block.py --device cuda --sweep --out "$out"
step python benchmarks/render.py
exit $status
