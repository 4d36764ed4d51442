#!/usr/bin/env python3
"""attach_python_bench: what a Python worker pays for weightd.attach() of a 300-tensor model.

Method. Writes a synthetic safetensors checkpoint of 300 F16 tensors of 128 x 256 (64 KiB each,
19.7 MB), starts the real `weightd` (host backend) on a temporary socket, loads it (hf recipe,
T=1) and times, in this process:
  1. weightd.attach(..., backend="numpy")  -> dict of 300 read-only numpy arrays
  2. weightd.attach(..., backend="torch")  -> dict of 300 torch tensors via DLPack (if torch
     imports)
  3. the floor: wd_attach + wd_attachment_release through ctypes alone (socket round trip, fd
     transfer, manifest validation, mmap; no Python objects per tensor)
  4. the alternative a user would pick: safetensors.{numpy,torch}.load_file of the same
     checkpoint from the page cache (a private copy, not shared across workers).
Each timed call builds the whole dict; the dict is then dropped (untimed), which detaches.
Median and p99 over --iters iterations after 5 warm-up calls. Target: <= 50 ms (DESIGN.md).

Usage: attach_python_bench.py [--weightd build/daemon/weightd] [--iters 200]
Environment: WEIGHTD_CLIENT_LIB and PYTHONPATH=client/python (as scripts/demo.sh sets them),
or an installed package and library.
"""
import argparse
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "client", "python"))
os.environ.setdefault("WEIGHTD_CLIENT_LIB", os.path.join(ROOT, "build", "client",
                                                         "libweightd_client.so"))
import weightd  # noqa: E402
from weightd import _lib  # noqa: E402

N_TENSORS, ROWS, COLS = 300, 128, 256


def write_checkpoint(d):
    os.makedirs(d)
    rng = np.random.default_rng(0)
    header, blobs, off = {}, [], 0
    for i in range(N_TENSORS):
        a = rng.standard_normal((ROWS, COLS)).astype(np.float16)
        header[f"model.layers.{i}.weight"] = {"dtype": "F16", "shape": [ROWS, COLS],
                                              "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for b in blobs:
            f.write(b)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"architectures": ["BenchModel"], "torch_dtype": "float16"}, f)


def timeit(fn, iters):
    for _ in range(5):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        r = fn()
        ts.append((time.perf_counter() - t0) * 1e3)
        del r
    ts.sort()
    return statistics.median(ts), ts[min(len(ts) - 1, int(0.99 * len(ts)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weightd", default=os.path.join(ROOT, "build", "daemon", "weightd"))
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()

    d = tempfile.mkdtemp(prefix="weightd-pybench-")
    proc = None
    try:
        ckpt = os.path.join(d, "ckpt")
        write_checkpoint(ckpt)
        sock = os.path.join(d, "weightd.sock")
        proc = subprocess.Popen([args.weightd, "--socket", sock, "--backend", "host"],
                                stderr=subprocess.DEVNULL)
        for _ in range(500):
            try:
                c = weightd.Client(sock)
                break
            except weightd.UnavailableError:
                time.sleep(0.02)
        c.load("bench", ckpt, recipe="hf", wait=True, timeout=120)
        mb = c.status("bench")["ranks"][0]["arena_bytes"] / 1e6
        print(f"model: {N_TENSORS} tensors, {mb:.1f} MB, host backend; {args.iters} iterations")
        rows = []

        lib = _lib.lib()

        def floor():
            h = ctypes.c_void_p()
            _lib.check(lib.wd_attach(c._h, b"bench", 0, ctypes.byref(h)))
            lib.wd_attachment_release(h)

        rows.append(("ctypes wd_attach + release (floor)", *timeit(floor, args.iters)))
        rows.append(("weightd.attach -> dict of numpy", *timeit(
            lambda: c.attach("bench", 0, backend="numpy"), args.iters)))
        try:
            import torch  # noqa: F401
            have_torch = True
        except ImportError:
            have_torch = False
        if have_torch:
            rows.append(("weightd.attach -> dict of torch (DLPack)", *timeit(
                lambda: c.attach("bench", 0, backend="torch"), args.iters)))
        try:
            from safetensors.numpy import load_file as np_load
            f = os.path.join(ckpt, "model.safetensors")
            rows.append(("safetensors.numpy.load_file (copy)", *timeit(lambda: np_load(f),
                                                                        args.iters)))
            if have_torch:
                from safetensors.torch import load_file as pt_load
                rows.append(("safetensors.torch.load_file (copy)", *timeit(lambda: pt_load(f),
                                                                            args.iters)))
        except ImportError:
            pass
        print(f"{'what':45s} {'median ms':>10s} {'p99 ms':>10s}")
        for name, med, p99 in rows:
            print(f"{name:45s} {med:10.2f} {p99:10.2f}")
        worst = max(med for name, med, _ in rows if name.startswith("weightd.attach"))
        print(f"target <= 50 ms: {'met' if worst <= 50 else 'MISSED'} (worst median {worst:.2f} ms)")
        c.unload("bench")
        c.close()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
