#!/usr/bin/env bash
# The first thing to run on a lent GPU machine, with a build carried from the development machine
# (`scripts/gpu-build.sh`, which bundles the libraries that machine lacks; carry `build-gpu`): the
# GPU tests against the real driver, compute-sanitizer on the CUDA executor, the load benchmark
# (warm and cold, against the loaders users pick), attach latency and bytes read at T=4, in one
# call of at most 8 minutes. See bench/gpu_acceptance.py for the method.
#
#   bench/gpu_acceptance.sh [--sim] [--build DIR] [--out DIR] [more gpu_acceptance.py flags]
#
# --sim: a dry run of every step on the simulated driver of tests/sim_cuda (CI runs it, so the
# script cannot rot). Its timings are not measurements.
# Writes OUT/gpu_acceptance.md and OUT/gpu_acceptance.json (OUT defaults to $OUT, the device
# tool's result folder, or ./gpu_acceptance_out).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BUILD="$HERE/../build-gpu"
[[ -d $BUILD ]] || BUILD="$HERE/../build"
OUTDIR=${OUT:-gpu_acceptance_out}
SIM=0
ARGS=()
while (($#)); do
  case "$1" in
    --sim) SIM=1; ARGS+=("$1") ;;
    --build) BUILD=$2; shift ;;
    --out) OUTDIR=$2; shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
BUILD=$(cd "$BUILD" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# A build made elsewhere (scripts/gpu-build.sh) records that checkout's absolute paths: make them
# resolve to this checkout.
SRC=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD/CMakeCache.txt")
if [[ -n $SRC && $SRC != "$ROOT" && ! -e $SRC ]]; then
  mkdir -p "$(dirname "$SRC")" && ln -s "$ROOT" "$SRC"
  echo "linked $SRC -> $ROOT (paths recorded by the build)"
fi
if [[ -d $BUILD/bundled-libs ]]; then
  export LD_LIBRARY_PATH="$BUILD/bundled-libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ((SIM)); then
  export WEIGHTD_CUDA_DRIVER="$BUILD/tests/sim_cuda/libwdsim_cuda.so"
  export WDSIM_DEVICES=${WDSIM_DEVICES:-4x1GiB}
  [[ -f $WEIGHTD_CUDA_DRIVER ]] || { echo "no simulated driver at $WEIGHTD_CUDA_DRIVER" >&2; exit 1; }
else
  unset WEIGHTD_CUDA_DRIVER
  date -u; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
fi
exec timeout 480 "${PYTHON:-python3}" "$HERE/gpu_acceptance.py" --build "$BUILD" --out "$OUTDIR" "${ARGS[@]}"
