#!/usr/bin/env bash
# The main job on an embedded default: build weightd, generate a small multi-shard
# Hugging Face-style checkpoint, and inspect it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target weightctl
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 tests/python/make_demo_checkpoint.py "$WORK/tiny-llama"
./build/client/weightctl inspect "$WORK/tiny-llama"
