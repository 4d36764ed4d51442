#!/usr/bin/env python3
"""update_memfd_bench: the Python client's writer of an update's memfd (weightd/_memfd.py), with
os.pwrite of contiguous host tensors (what Client.update does) against copying every tensor
through a writable mapping of the memfd (its path for CUDA, strided or big-endian tensors).

Usage: update_memfd_bench.py [--rounds 5]

Method: one Llama-3-8B decoder layer of random uint16 (seven matrices, 436 MB), written into a
fresh sealed memfd per round by each method in alternating order, 0.5 s apart; the memfd is
closed after each. Prints every round's seconds and the medians.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "client", "python"))

import numpy as np  # noqa: E402

import weightd._memfd as memfd  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096),
          (14336, 4096), (4096, 14336)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.0.w{i}": rng.integers(0, 65535, size=s, dtype=np.uint16)
               for i, s in enumerate(SHAPES)}
    total = sum(t.nbytes for t in tensors.values())
    real = memfd._host_bytes
    methods = {"pwrite": real, "mapping": lambda value, kind: None}
    res = {k: [] for k in methods}
    for r in range(a.rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for k in order:
            memfd._host_bytes = methods[k]
            time.sleep(0.5)
            t = time.perf_counter()
            fd = memfd.safetensors_memfd(tensors)
            res[k].append(time.perf_counter() - t)
            os.close(fd)
    memfd._host_bytes = real
    print(f"{total / 1e6:.0f} MB in {len(tensors)} tensors, {a.rounds} rounds")
    for k, v in res.items():
        med = statistics.median(v)
        print(f"{k:8} {' '.join(f'{x:.3f}' for x in v)}  median {med:.3f} s "
              f"({total / med / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
