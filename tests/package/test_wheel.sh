#!/usr/bin/env bash
# The Python wheel: built from client/python with pip (scikit-build-core runs the project's
# CMake for libweightd_client.so alone), installed into a fresh venv, and used against a
# running daemon with nothing set: no WEIGHTD_CLIENT_LIB, LD_LIBRARY_PATH, PYTHONPATH or build
# tree. Also checks the wheel's contents (the library, its RPATH, the bundled Abseil) and
# `python -m weightd`.
# Usage: test_wheel.sh SOURCE_DIR WEIGHTD_BIN CHECKPOINT_WRITER PYTHON
set -euo pipefail
src=$(cd "$1" && pwd)
weightd_bin=$2
make_ckpt=$3
python=$4
work=$(mktemp -d /tmp/weightd-wheel-XXXXXX)
daemon=""
cleanup() {
  [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$python" -m pip wheel "$src/client/python" -w "$work/dist" --no-deps -q ||
  fail "pip wheel ./client/python"
wheel=$(ls "$work"/dist/weightd-*.whl)
echo "wheel: $wheel"
contents=$(unzip -Z1 "$wheel")
for f in weightd/__init__.py weightd/__main__.py weightd/libweightd_client.so.0; do
  grep -qx "$f" <<<"$contents" || fail "the wheel lacks $f"
done
grep -q '^weightd/libabsl_' <<<"$contents" || fail "the wheel does not bundle Abseil"
mkdir "$work/unzipped"
(cd "$work/unzipped" && unzip -q "$wheel")
readelf -d "$work/unzipped/weightd/libweightd_client.so.0" | grep -q 'RPATH.*\$ORIGIN' ||
  fail "libweightd_client.so.0 in the wheel has no \$ORIGIN RPATH"

"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$wheel" || fail "pip install of the wheel into a fresh venv"

"$python" "$make_ckpt" "$work/ckpt" >/dev/null
sock=$work/s
"$weightd_bin" --socket "$sock" --backend host 2>"$work/weightd.log" &
daemon=$!
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.05; done
[[ -S $sock ]] || fail "weightd did not listen: $(cat "$work/weightd.log")"

# Nothing but PATH and HOME: the wheel's library is found next to its package.
clean_env=(env -i "PATH=/usr/bin:/bin" "HOME=$work")
cd "$work"
"${clean_env[@]}" "$work/venv/bin/python" - "$sock" "$work/ckpt" <<'PY' || fail "attach from the venv"
import sys
import weightd
sock, ckpt = sys.argv[1], sys.argv[2]
assert "/venv/" in weightd.__file__, weightd.__file__
with weightd.Client(sock) as c:
    c.load("tiny", ckpt, tp=2, wait=True, timeout=60)
    w = c.attach("tiny", rank=1, backend="numpy")
    assert len(w) > 0 and w.generation == 1, (len(w), w.generation)
    name = next(iter(w))
    assert w[name].nbytes > 0
print("attached", len(w), "tensors from the wheel")
PY
out=$("${clean_env[@]}" "$work/venv/bin/python" -m weightd --socket "$sock") ||
  fail "python -m weightd"
grep -q '^tiny .*ready .*tp=2 ranks=2' <<<"$out" || fail "python -m weightd printed: $out"
grep -q 'rank 1: ready' <<<"$out" || fail "python -m weightd printed: $out"
echo "$out"
echo "wheel checks passed"
