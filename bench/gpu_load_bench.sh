#!/usr/bin/env bash
# GPU load benchmark for the lent H100 machine: warm and cold, weightd against safetensors,
# safe_open+copy_, from_pretrained, with the pinned-H2D and O_DIRECT ceilings in the same run.
# See bench/gpu_load_bench.py for the method. Cold runs drop caches (root).
#   bench/gpu_load_bench.sh [BUILD_DIR] [CKPT_DIR]
set -euo pipefail
BUILD=${1:-build}
CKPT=${2:-/tmp/llama3-8b}
HERE=$(cd "$(dirname "$0")" && pwd)
date -u; nproc; lscpu | grep 'Model name' || true; nvidia-smi --query-gpu=name,driver_version --format=csv
python3 "$HERE/gpu_load_bench.py" --build "$BUILD" --ckpt "$CKPT"
python3 "$HERE/gpu_load_bench.py" --build "$BUILD" --ckpt "$CKPT" --cold --io-mode auto
python3 "$HERE/gpu_load_bench.py" --build "$BUILD" --ckpt "$CKPT" --cold --io-mode pread
