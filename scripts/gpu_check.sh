#!/usr/bin/env bash
# For a GPU machine with torch preinstalled and no network. Stages, so that each call stays short (a lent GPU
# machine may cap one command at ~10 minutes; build once, then run the other stages one by one):
#   scripts/gpu_check.sh build              build fastcnn in place (all cores) and print fastcnn.info
#   scripts/gpu_check.sh test [ARGS...]     the tests that CI skips or interprets - every test whose id or marks say
#                                           cuda or triton - (or pytest ARGS), then the Triton kernel tests once more
#                                           under the interpreter, as CI runs them
#   scripts/gpu_check.sh sanitize           compute-sanitizer memcheck + racecheck over the CUDA kernels' tests
#   scripts/gpu_check.sh bench NAME [ARGS]  benchmarks/bench_NAME.py --device cuda (conv_block, optim, residual,
#                                           conv_bn, inception, conv_transpose, models), then render.py
#   scripts/gpu_check.sh all                every stage and every benchmark, in that order
# Results go to $OUT (default benchmarks/results). Every step of a stage runs even if an earlier one fails; the exit
# status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
status=0
step() { echo "=== $*"; "$@" || { echo "=== FAILED: $*"; status=1; }; }
pytest_q() { python -m pytest -q -p no:cacheprovider "$@"; }

# The test files of the compiled CUDA kernels, for the sanitizer (it slows kernels ~100x: CUDA cases only).
CUDA_KERNEL_TESTS=(tests/ops/test_conv_relu_pool.py tests/ops/test_batch_norm_ops.py tests/ops/test_optim_ops.py
                   tests/ops/test_conv_transpose.py tests/ops/test_channel_slice.py)
BENCHMARKS=(conv_block optim residual conv_bn inception conv_transpose models)

# The packages the tests and benchmarks import besides torch: the machine has no network, so say up front which are
# missing (their test files then fail to collect; run_tests goes on with the others).
OPTIONAL_PACKAGES=(numpy triton torchvision hypothesis matplotlib sklearn skimage PIL)

build() {
  step env MAX_JOBS="$(nproc)" pip install --no-build-isolation --no-deps -e .
  step python -m fastcnn.info
  for name in "${OPTIONAL_PACKAGES[@]}"; do
    python -c "import importlib; print('=== $name', getattr(importlib.import_module('$name'), '__version__', ''))" \
      2>/dev/null || echo "=== $name: MISSING"
  done
}

run_tests() {
  if [ $# -gt 0 ]; then
    step pytest_q "$@"
  else
    step pytest_q tests -k "cuda or triton" --continue-on-collection-errors --junitxml="$out/gpu_tests.xml"
  fi
  step env TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/ops/test_triton_kernels.py
}

sanitize() {
  if ! command -v compute-sanitizer >/dev/null; then
    echo "=== compute-sanitizer not found: skipped"
    return
  fi
  for tool in memcheck racecheck; do
    step compute-sanitizer --tool "$tool" --error-exitcode 1 python -m pytest -q -p no:cacheprovider -x \
      "${CUDA_KERNEL_TESTS[@]}" -k "cuda and not compile"
  done
}

bench() {
  local name=$1
  shift
  step python "benchmarks/bench_$name.py" --device cuda --out "$out" "$@"
  step python benchmarks/render.py
}

stage=${1:-all}
[ $# -gt 0 ] && shift
case "$stage" in
  build) build ;;
  test) run_tests "$@" ;;
  sanitize) sanitize ;;
  bench) bench "$@" ;;
  all)
    build
    run_tests
    step pytest_q tests
    sanitize
    for name in "${BENCHMARKS[@]}"; do bench "$name"; done
    step python benchmarks/bench_conv_block.py --device cuda --sweep --out "$out"
    ;;
  *) echo "usage: $0 build | test [pytest args] | sanitize | bench NAME [args] | all" >&2; exit 2 ;;
esac
exit $status
