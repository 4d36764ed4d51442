#!/usr/bin/env python3
"""host_load_bench: weightd's host backend against the loaders a CPU user would pick, and
against what the machine allows, in the same run.

Usage: host_load_bench.py [--build BUILD] [--gb 4] [--rounds 5] [--threads 2] [--cold]
                          [--no-shard] [--work DIR] [--b-config '{"io_mode": "auto"}']
                          [--b-daemon OTHER/weightd]

Method: writes a Llama-3-8B-shaped bf16 checkpoint of about --gb GB (4 shards, update_bench's
writer) and reads it once into the page cache. Then --rounds interleaved rounds, each running,
in this order (so that drift of a shared machine touches every entry alike):
  - ceilings (bench/host_read_ceiling, --threads workers, 16 MiB pieces): pread into a reused
    buffer; into fresh malloc'ed memory; into a fresh memfd with a CRC32C per MiB (the work a
    host load cannot avoid: the floor weightd is held to, >= 0.95x); the same after
    MADV_POPULATE_WRITE (page zeroing paid up front); pread into a reused 1 MiB buffer + CRC +
    pwrite into a fresh memfd (what weightd's host executor does);
  - weightd load at TP 1, 2 and 4 (a daemon with the host backend, io_threads = --threads):
    wall time from the load request to generation 1, then a forced unload and a wait until the
    arenas' shmem is back with the kernel (so no entry pays for freeing another's memory);
  - safetensors.numpy.load_file and safetensors.torch.load_file of every shard (a fresh
    process each, timed inside it; torch from /usr/bin/python3 when this python lacks it);
    Run:ai's streamer when `runai_model_streamer` imports;
  - `weightctl shard --tp 2` (its default workers; writes + fsync) against `cp -r` + `sync` of the checkpoint
    (target >= 0.8x), unless --no-shard;
  - time to usable weights, as whole processes: a Python process that attaches rank 0 of the
    TP=1 model and touches one byte per page, against one that load_file()s and touches alike;
  - with --cold: page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`, root) before a
    weightd TP=1 load and before `cat` of the checkpoint files (target >= 0.9x cat).
With --b-config and/or --b-daemon, a second daemon (whose config adds those keys, or another
build of weightd) loads at TP 1/2/4 right after the first in every round ("weightd[B]"): an
A/B of a daemon setting or of two builds within the same rounds.
Prints per entry min and median (seconds, GB/s of checkpoint bytes) and the ratios of weightd
to each floor and alternative (medians).
"""
import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import update_bench as ub  # noqa: E402  (checkpoint writer and Llama-3-8B shapes)

LOADER = r"""
import sys, time, glob
kind, d = sys.argv[1], sys.argv[2]
files = sorted(glob.glob(d + "/*.safetensors"))
t = time.perf_counter()
if kind == "numpy":
    from safetensors.numpy import load_file
    out = [load_file(f) for f in files]
elif kind == "torch":
    from safetensors.torch import load_file
    out = [load_file(f) for f in files]
elif kind == "runai":
    from runai_model_streamer import SafetensorsStreamer
    out = []
    for f in files:
        with SafetensorsStreamer() as s:
            s.stream_file(f)
            out.append({n: t.clone() for n, t in s.get_tensors()})
print(time.perf_counter() - t)
"""

# Time to usable weights, whole process: import, get the tensors, touch one byte per page.
USABLE_ATTACH = r"""
import sys, numpy as np, weightd
c = weightd.Client(sys.argv[1])
a = c.attach(sys.argv[2], 0, backend="numpy")
s = 0
for t in a.values():
    s += int(np.asarray(t).reshape(-1).view(np.uint8)[::4096].sum())
"""
USABLE_LOAD_FILE = r"""
import sys, glob, numpy as np
from safetensors.numpy import load_file
s = 0
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    for t in load_file(f).values():
        s += int(t.reshape(-1).view(np.uint8)[::4096].sum())
"""


def has_module(python, mod, env=None):
    return subprocess.run([python, "-c", f"import {mod}"], capture_output=True,
                          env=env).returncode == 0


def as_f16(files):
    """Relabels the checkpoint's BF16 tensors as F16 in place (same bytes, same header length:
    `"F16" ` for `"BF16"`), so that safetensors.numpy, which has no bfloat16, can load it."""
    for f in files:
        with open(f, "r+b") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h = fh.read(n)
            if b'"BF16"' in h:
                fh.seek(8)
                fh.write(h.replace(b'"BF16"', b'"F16" '))


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def shmem_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def settle(baseline, limit=15.0):
    """Waits (bounded) until the memory of unloaded arenas is back with the kernel: the daemon
    frees them on a thread of its own, and freeing 1 GB of shmem pages overlapping the next
    entry would be charged to it."""
    deadline = time.monotonic() + limit
    while shmem_bytes() > baseline + (64 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)


def warm(d):
    for f in glob.glob(os.path.join(d, "*")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--gb", type=float, default=4.0, help="checkpoint size to aim at (GB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="reader threads of every contender")
    ap.add_argument("--cold", action="store_true", help="also cold loads (root)")
    ap.add_argument("--no-shard", action="store_true")
    ap.add_argument("--work", help="directory for the checkpoint (kept; default: a temp dir)")
    ap.add_argument("--b-config", help="JSON object of daemon config keys for a B daemon")
    ap.add_argument("--b-daemon", help="weightd binary of the B daemon (default: --build's)")
    ap.add_argument("--raw", action="store_true", help="also print every round's seconds")
    a = ap.parse_args()
    build = os.path.abspath(a.build)
    os.environ.setdefault("WEIGHTD_CLIENT_LIB",
                          os.path.join(build, "client", "libweightd_client.so"))
    pypath = os.path.join(ROOT, "client", "python")
    sys.path.insert(0, pypath)
    os.environ["PYTHONPATH"] = pypath + os.pathsep + os.environ.get("PYTHONPATH", "")
    import weightd

    fixed = ub.nbytes((ub.V, ub.H)) * 2 + ub.nbytes((ub.H,))
    per_layer = sum(ub.nbytes(s) for s in ub.layer_shapes(0).values())
    layers = max(1, round((a.gb * 1e9 - fixed) / per_layer))
    shapes = ub.model_shapes(layers)
    total = sum(ub.nbytes(s) for s in shapes.values())
    work = a.work or tempfile.mkdtemp(prefix="weightd-host-bench-")
    ckpt = os.path.join(work, f"llama-{layers}l")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        shutil.rmtree(ckpt, ignore_errors=True)
        ub.write_checkpoint(ckpt, shapes, layers, seed=1)
    files = sorted(glob.glob(os.path.join(ckpt, "*.safetensors")))
    as_f16(files)
    ckpt_bytes = sum(os.path.getsize(f) for f in files)
    warm(ckpt)
    run = tempfile.mkdtemp(prefix="weightd-host-bench-run-")
    def start_daemon(tag, extra, binary=os.path.join(build, "daemon", "weightd")):
        sock = os.path.join(run, f"weightd{tag}.sock")
        with open(os.path.join(run, f"weightd{tag}.json"), "w") as f:
            json.dump({"socket": sock, "backend": "host", "io_threads": a.threads, **extra}, f)
        log = open(os.path.join(run, f"weightd{tag}.log"), "w")
        return sock, subprocess.Popen([binary, "--config",
                                       os.path.join(run, f"weightd{tag}.json")], stderr=log)

    sock, proc = start_daemon("", {})
    procs = [proc]
    sock_b = None
    if a.b_config or a.b_daemon:
        sock_b, proc_b = start_daemon("-b", json.loads(a.b_config or "{}"),
                                      *([os.path.abspath(a.b_daemon)] if a.b_daemon else []))
        procs.append(proc_b)
    ceiling = os.path.join(build, "bench", "host_read_ceiling")
    weightctl = os.path.join(build, "client", "weightctl")
    torch_py = sys.executable if has_module(sys.executable, "torch") else "/usr/bin/python3"
    torch_env = None
    if not has_module(torch_py, "safetensors"):
        # safetensors' extension is abi3: this python's copy serves another interpreter too.
        import safetensors
        shim = os.path.join(run, "shim")
        os.makedirs(shim)
        os.symlink(os.path.dirname(safetensors.__file__), os.path.join(shim, "safetensors"))
        torch_env = dict(os.environ, PYTHONPATH=shim)
    have_torch = has_module(torch_py, "torch", torch_env) and has_module(torch_py,
                                                                         "safetensors.torch",
                                                                         torch_env)
    runai_py = next((p for p in (sys.executable, "/usr/bin/python3")
                     if has_module(p, "runai_model_streamer")), None)
    res = {}

    def add(key, secs):
        res.setdefault(key, []).append(secs)

    try:
        def connect(path):
            for _ in range(500):
                try:
                    return weightd.Client(path)
                except weightd.UnavailableError:
                    time.sleep(0.02)
            return weightd.Client(path)
        c, waiter = connect(sock), connect(sock)
        clients = {"": (c, waiter)}
        if sock_b:
            clients["b"] = (connect(sock_b), connect(sock_b))

        def weightd_load(name, tp, which=""):
            cl, wt = clients[which]
            t = time.perf_counter()
            cl.load(name, ckpt, tp=tp)
            gen, timed_out = wt.wait_generation(name, 0, timeout=900)
            secs = time.perf_counter() - t
            st = cl.status(name)
            assert gen == 1 and not timed_out and st["state"] == "ready", st
            return secs

        print(f"checkpoint: {layers} layers of Llama-3-8B shapes, {total / 1e9:.2f} GB bf16 in "
              f"{len(files)} shards; {a.threads} threads; {a.rounds} rounds; "
              f"torch from {torch_py if have_torch else 'nowhere'}; Run:ai streamer "
              f"{'from ' + runai_py if runai_py else 'not installed'}")
        shmem0 = shmem_bytes()
        for r in range(a.rounds):
            for mode in ("reused", "malloc", "memfd", "populate", "pwrite"):
                out = subprocess.run([ceiling, mode, str(a.threads), *files], check=True,
                                     capture_output=True, text=True).stdout.split()
                add(f"ceiling: pread into {mode}", float(out[1]))
            for tp in (1, 2, 4):
                add(f"weightd load tp={tp}", weightd_load("bench", tp))
                if tp == 1:
                    t = time.perf_counter()
                    subprocess.run([sys.executable, "-c", USABLE_ATTACH, sock, "bench"],
                                   check=True)
                    add("usable: attach + touch (process)", time.perf_counter() - t)
                c.unload("bench", force=True)
                settle(shmem0)
                if sock_b:
                    add(f"weightd[B] load tp={tp}", weightd_load("bench", tp, "b"))
                    clients["b"][0].unload("bench", force=True)
                    settle(shmem0)
            loaders = [("numpy", sys.executable, None)]
            if have_torch:
                loaders.append(("torch", torch_py, torch_env))
            if runai_py:
                loaders.append(("runai", runai_py, None))
            for kind, py, env in loaders:
                out = subprocess.run([py, "-c", LOADER, kind, ckpt], check=True,
                                     capture_output=True, text=True, env=env).stdout
                add(f"safetensors {kind} load_file" if kind != "runai" else "Run:ai streamer",
                    float(out.split()[-1]))
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", USABLE_LOAD_FILE, ckpt], check=True)
            add("usable: load_file + touch (process)", time.perf_counter() - t)
            if not a.no_shard:
                # Alternated order: the run right after a deletion of the other's output pays
                # for its discards (ext4 mounted with `discard` on the development VM).
                for what in ("shard", "cp") if r % 2 == 0 else ("cp", "shard"):
                    dst = os.path.join(work, f"out-{what}")
                    shutil.rmtree(dst, ignore_errors=True)
                    subprocess.run(["sync"], check=True)
                    time.sleep(2)
                    t = time.perf_counter()
                    if what == "shard":
                        # Its default workers (half the cores): writing is the bound.
                        subprocess.run([weightctl, "shard", ckpt, "--tp", "2", "--out", dst],
                                       check=True, capture_output=True)
                    else:
                        subprocess.run(["cp", "-r", ckpt, dst], check=True)
                        subprocess.run(["sync"], check=True)
                    add("weightctl shard --tp 2 (fsync)" if what == "shard" else "cp -r + sync",
                        time.perf_counter() - t)
                    shutil.rmtree(dst, ignore_errors=True)
            if a.cold:
                drop_caches()
                add("cold: weightd load tp=1", weightd_load("bench", 1))
                c.unload("bench", force=True)
                settle(shmem0)
                drop_caches()
                t = time.perf_counter()
                subprocess.run(["sh", "-c", "cat \"$@\" > /dev/null", "cat", *files], check=True)
                add("cold: cat of the checkpoint", time.perf_counter() - t)
                warm(ckpt)
            print(f"round {r + 1}/{a.rounds} done; load average {os.getloadavg()[0]:.1f}",
                  flush=True)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\n{'entry':44} {'min s':>8} {'median s':>9} {'GB/s (med)':>10}")
    for k, v in res.items():
        print(f"{k:44} {min(v):8.3f} {med[k]:9.3f} {ckpt_bytes / med[k] / 1e9:10.2f}")
    if a.raw:
        print("\nevery round, in order (s):")
        for k, v in res.items():
            print(f"{k:44} " + " ".join(f"{x:.3f}" for x in v))
    print("\nratios (medians, GB/s of weightd / GB/s of the other; > 1: weightd faster):")
    floor = med["ceiling: pread into memfd"]
    for tp in (1, 2, 4):
        w = med[f"weightd load tp={tp}"]
        line = f"  weightd tp={tp}: {floor / w:.2f}x the fresh-memfd+CRC floor (target 0.95)"
        line += f", {med['ceiling: pread into populate'] / w:.2f}x populate"
        line += f", {med['ceiling: pread into pwrite'] / w:.2f}x pwrite"
        line += f", {med['safetensors numpy load_file'] / w:.2f}x numpy load_file"
        if "safetensors torch load_file" in med:
            line += f", {med['safetensors torch load_file'] / w:.2f}x torch load_file"
        if "Run:ai streamer" in med:
            line += f", {med['Run:ai streamer'] / w:.2f}x Run:ai"
        print(line)
    if sock_b:
        what = " ".join(x for x in (a.b_config, a.b_daemon) if x)
        for tp in (1, 2, 4):
            w, b = med[f"weightd load tp={tp}"], med[f"weightd[B] load tp={tp}"]
            print(f"  weightd[B] tp={tp} ({what}): {w / b:.2f}x weightd, "
                  f"{floor / b:.2f}x the floor")
    if "weightctl shard --tp 2 (fsync)" in med:
        print(f"  weightctl shard: {med['cp -r + sync'] / med['weightctl shard --tp 2 (fsync)']:.2f}"
              "x cp -r + sync (target 0.8)")
    print(f"  time to usable weights: load_file + touch / attach + touch = "
          f"{med['usable: load_file + touch (process)'] / med['usable: attach + touch (process)']:.1f}x")
    if a.cold:
        print(f"  cold: {med['cold: cat of the checkpoint'] / med['cold: weightd load tp=1']:.2f}x "
              "cat (target 0.9)")


if __name__ == "__main__":
    main()
