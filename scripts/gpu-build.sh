#!/usr/bin/env bash
# Builds what a lent GPU machine runs (bench/gpu_acceptance.sh), here, so that it can travel:
#   - Release, tests on; no LibTorch adapter, benchmarks or fuzzers (the GPU machine has no
#     LibTorch, and the acceptance run needs none of them);
#   - the shared libraries that machine lacks (Debian's Abseil; libsystemd) copied into
#     BUILD/bundled-libs, which gpu_acceptance.sh puts on LD_LIBRARY_PATH; liburing and GoogleTest
#     are linked statically already;
#   - object files dropped, so the folder stays well under the 64 MiB a device call carries.
# The build records absolute paths of this checkout (ctest files, test data paths);
# gpu_acceptance.sh links them to wherever the checkout lands on the GPU machine.
#   scripts/gpu-build.sh [BUILD_DIR]      (default build-gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build-gpu}
bash scripts/install-deps.sh
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DWEIGHTD_BUILD_BENCH=OFF \
  -DWEIGHTD_BUILD_TORCH=OFF -DWEIGHTD_BUILD_FUZZ=OFF >/dev/null
cmake --build "$BUILD" -j "${JOBS:-$(nproc)}"
mkdir -p "$BUILD/bundled-libs"
find "$BUILD" -type f \( -perm -u+x -o -name '*.so*' \) -not -path '*/bundled-libs/*' -print0 |
  while IFS= read -r -d '' f; do
    file -b "$f" | grep -q '^ELF' || continue
    ldd "$f" 2>/dev/null | awk '/libabsl_|libsystemd\.so/ {print $3}'
  done | sort -u | while read -r lib; do cp -L "$lib" "$BUILD/bundled-libs/"; done
find "$BUILD" -name '*.o' -delete
strip --strip-debug "$BUILD"/bundled-libs/* 2>/dev/null || true
du -sh "$BUILD" "$BUILD/bundled-libs"
