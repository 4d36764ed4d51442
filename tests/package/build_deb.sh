#!/usr/bin/env bash
# Builds the Debian package of BUILD_DIR into OUT_DIR with cpack and prints its path.
set -euo pipefail
build=$1
out=$2
mkdir -p "$out"
cmake --build "$build" --target weightd weightctl weightd_client_shared weightd_client_cpp \
  weightd_man_pages >&2
(cd "$out" && cpack -G DEB --config "$build/CPackConfig.cmake" -B "$out" >&2)
ls "$out"/weightd_*.deb
