#!/usr/bin/env bash
# The whole test suite, as README.md and .ci/run give it. Installs what is missing, then:
#   1. the default build (CUDA on when nvcc is found) and every ctest test in it, the vLLM tests
#      (python_vllm, against the CPU build of vLLM that scripts/install-vllm.sh installs) included;
#   2. a clang build with AddressSanitizer + UndefinedBehaviorSanitizer, CUDA off, running the
#      unit tests under the sanitizers and each libFuzzer target for a bounded time.
# GPU tests skip themselves (with a reason) where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# vLLM (CPU build) in a venv of its own, for the vLLM loader tests; cached between runs.
bash scripts/install-vllm.sh

JOBS=${JOBS:-$(nproc)}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}

echo "== build: default (RelWithDebInfo, CUDA auto) =="
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DWEIGHTD_BUILD_TORCH=ON \
  -DWEIGHTD_VLLM_TESTS=ON >/dev/null
cmake --build build -j "$JOBS"
echo "== tests: default build =="
(cd build && ctest --output-on-failure -j "$JOBS" -LE fuzz)

echo "== build: clang, ASan + UBSan, CUDA off, fuzzers =="
CC=clang CXX=clang++ cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug \
  -DWEIGHTD_ENABLE_CUDA=OFF -DWEIGHTD_BUILD_BENCH=OFF -DWEIGHTD_BUILD_FUZZ=ON \
  -DWEIGHTD_SANITIZE=address,undefined -DWEIGHTD_FUZZ_SECONDS="$FUZZ_SECONDS" >/dev/null
cmake --build build-asan -j "$JOBS"
echo "== tests: sanitizers and fuzzing =="
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j "$JOBS")
