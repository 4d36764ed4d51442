#!/usr/bin/env bash
# The main job on an embedded default, end to end:
#   install what is missing, build, generate a small multi-shard Hugging Face-style checkpoint,
#   start weightd (host backend without a GPU) on a temporary socket, load the checkpoint at
#   tensor-parallel degree 2 and wait, attach both ranks from Python (zero-copy), print a per-rank
#   summary and the load throughput, and stop the daemon with SIGTERM (also on error).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target weightd weightctl weightd_client_shared

PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/weightd-demo-XXXXXX)
DAEMON_PID=""
stop_daemon() {
  # SIGTERM, then wait for the exit status; returns it (0 = clean shutdown).
  local rc=0
  if [[ -n "$DAEMON_PID" ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID"
    wait "$DAEMON_PID" || rc=$?
  fi
  DAEMON_PID=""
  return "$rc"
}
on_exit() {
  local rc=$?
  if [[ -n "$DAEMON_PID" ]]; then
    stop_daemon || true
    if ((rc != 0)) && [[ -f "$WORK/weightd.log" ]]; then
      echo "---- weightd log (last 20 lines) ----" >&2
      tail -n 20 "$WORK/weightd.log" >&2
    fi
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# auto = the cuda backend when it is compiled in and a GPU is present, else host (sealed memfds).
BACKEND=${BACKEND:-auto}

echo "== checkpoint =="
"$PYTHON" tests/python/make_demo_checkpoint.py "$WORK/tiny-llama"
./build/client/weightctl inspect "$WORK/tiny-llama" | head -n 5

echo "== weightd ($BACKEND backend) =="
SOCK="$WORK/weightd.sock"
./build/daemon/weightd --socket "$SOCK" --backend "$BACKEND" 2>"$WORK/weightd.log" &
DAEMON_PID=$!
for _ in $(seq 200); do
  [[ -S "$SOCK" ]] && ./build/client/weightctl status --socket "$SOCK" >/dev/null 2>&1 && break
  kill -0 "$DAEMON_PID" 2>/dev/null || { echo "weightd exited early" >&2; exit 1; }
  sleep 0.05
done

echo "== weightctl load tiny-llama --tp 2 --wait =="
./build/client/weightctl --socket "$SOCK" load tiny-llama "$WORK/tiny-llama" --tp 2 --wait
echo "== weightctl status tiny-llama =="
./build/client/weightctl --socket "$SOCK" status tiny-llama

echo "== attach from Python =="
WEIGHTD_CLIENT_LIB="$ROOT/build/client/libweightd_client.so" PYTHONPATH="$ROOT/client/python" \
  WEIGHTD_SOCKET="$SOCK" "$PYTHON" - <<'EOF'
import time

import numpy  # noqa: F401  (imported up front: the attach times below exclude it)

import weightd

c = weightd.Client()
st = c.status("tiny-llama")
print(f"load: {st['bytes_total'] / 1e6:.2f} MB read in {st['seconds'] * 1e3:.1f} ms "
      f"({st['bytes_total'] / max(st['seconds'], 1e-9) / 1e9:.2f} GB/s), backend {st['backend']}")
for rank in range(st["tp"]):
    t0 = time.perf_counter()
    w = c.attach("tiny-llama", rank=rank)
    ms = (time.perf_counter() - t0) * 1e3
    kind = type(next(iter(w.values()))).__module__.split(".")[0]
    nbytes = sum(t.nbytes if hasattr(t, "nbytes") else t.numel() * t.element_size()
                 for t in w.values())
    print(f"rank {rank}: {len(w)} tensors, {nbytes / 1e6:.2f} MB, {kind} views, "
          f"attached in {ms:.2f} ms")
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.embed_tokens.weight"):
        t = w[name]
        print(f"    {name}: {tuple(t.shape)} {t.dtype}")
    leases = [l["pid"] for r in c.status("tiny-llama")["ranks"] for l in r["leases"]]
    print(f"    leases held while attached: pids {leases}")
    del w
EOF

echo "== stop weightd =="
./build/client/weightctl unload tiny-llama --socket "$SOCK"
if stop_daemon; then
  echo "weightd stopped cleanly (exit 0)"
else
  rc=$?
  echo "weightd exited with status $rc" >&2
  exit 1
fi
