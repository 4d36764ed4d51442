#!/usr/bin/env python3
"""update_bench: a live weight update (a new generation) against a fresh load of the same model,
and what a worker pays to move onto it (Attachment.refresh()).

Usage: update_bench.py [--build build] [--gb 4.0 | --layers N] [--rounds 3] [--io-threads 2]
                       [--keep-previous] [--segment-bytes N] [--work DIR] [--keep]
Environment: WEIGHTD_CLIENT_LIB and PYTHONPATH=client/python are set from --build and this
checkout unless already set. Run it with an interpreter that has torch (Debian's
/usr/bin/python3 here) for the update from a dict of torch.bfloat16 tensors; without torch (and
without ml_dtypes), numpy has no bfloat16 and the one-layer update is sent as a one-layer
.safetensors file instead (the output says which).

Method. Writes two checkpoints of identical Llama-3-8B shapes (H 4096, 32 heads, 8 KV heads,
I 14336, V 128256, bf16; --layers decoder layers, by default as many as fit in --gb), A and B,
with different bytes (a 32 MiB random block per checkpoint, tiled), 4 shards + index each, with
a direct safetensors writer; both are read once so they sit in the page cache (every figure is
warm). Starts the real `weightd --backend host` on a temporary socket. Then, in each round:
  1. fresh load: unload the model (if any), `load` A at tp=2; timed from the request until
     wait_generation reports generation 1 (the load finished), on a second connection;
  2. a worker process attaches both ranks (numpy arrays, or torch tensors when it has torch);
  3a. fresh load of B as a second model while A is held, then its unload: the same work as the
     full update at the same memory footprint (an update holds generation N while it writes
     N+1); this and the update start SETTLE s after memory was last freed;
  3. full update: Client.update(name, B, wait=True): from the request until the reply that the
     new generation is published (the daemon plans, reads B, writes the new arenas, seals them,
     publishes atomically);
  4. the worker times refresh() of rank 0, then of rank 1 (the new arenas mapped at the same
     addresses), each followed by a second refresh() (nothing new: one round trip, the floor).
     They are reported apart: the refresh that moves the old generation's last lease is the one
     during which that generation's memory is released;
  5. one-layer update: Client.update(name, {the 9 tensors of layer 0: new torch.bfloat16
     tensors}, wait=True), timed from the call (which first copies the tensors into a sealed
     memfd) until the reply; the daemon's own `seconds` is reported too;
  6. the worker refreshes again (timed), and exits.
Each checkpoint is read again (cat, untimed) just before the operation that reads it, so that
both run from the page cache even when other processes pressed on it meanwhile. The rounds
interleave the three operations so that drift in the machine's load touches all of them alike.
Reported per figure: min and median over the rounds (refresh: over all rounds and both
updates), and the ratios full update / fresh load and one-layer / full update next to the
ratio of bytes the one-layer update reads. --keep-previous runs the daemon with
keep_previous_generation (one more generation of memory: 3x the model during an update).
--segment-bytes sets the daemon's arena_segment_bytes (default: the daemon's, 256 MiB; 0 = one
arena per rank, the layout before segments): each rank is several arenas of whole layers, and
an update allocates and writes only those holding targets it touches. The one-layer update's
reply says how many arenas it replaced and how many bytes it allocated and copied; printed.

Whether the page cache held is checked, not assumed: the /proc/vmstat counters pgpgin (read
from disk) and pgscan_* (reclaim) are summed over each kind of operation and printed.

Memory: the daemon holds two generations during an update (about 2x the model) and the page
cache holds A and B: size --gb so that 4x fits in RAM (`free -g`).
"""
import argparse
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
H, NH, NKV, HD, I, V = 4096, 32, 8, 128, 14336, 128256
TP = 2
# Seconds between freeing memory and the next timed operation (the reaper frees in the background).
SETTLE = 3


def layer_shapes(l):
    p = f"model.layers.{l}."
    return {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (NH * HD, H),
            p + "self_attn.k_proj.weight": (NKV * HD, H),
            p + "self_attn.v_proj.weight": (NKV * HD, H),
            p + "self_attn.o_proj.weight": (H, NH * HD),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I)}


def model_shapes(layers):
    out = {"model.embed_tokens.weight": (V, H)}
    for l in range(layers):
        out.update(layer_shapes(l))
    out["model.norm.weight"] = (H,)
    out["lm_head.weight"] = (V, H)
    return out


def nbytes(shape):
    return int(np.prod(shape)) * 2


def write_checkpoint(d, shapes, layers, seed, shards=4):
    """A Hugging Face-style bf16 checkpoint: `shards` safetensors files + index + config.json.
    Data: a 32 MiB random block drawn from `seed`, tiled (cheap to write, not zeros)."""
    os.makedirs(d)
    block = np.random.default_rng(seed).integers(0, 1 << 16, size=16 << 20,
                                                 dtype=np.uint16).tobytes()
    names = list(shapes)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for n in part:
            header[n] = {"dtype": "BF16", "shape": list(shapes[n]),
                         "data_offsets": [off, off + nbytes(shapes[n])]}
            off += nbytes(shapes[n])
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(d, fname), "wb") as f:
            f.write(len(h).to_bytes(8, "little") + h)
            for n in part:
                left = nbytes(shapes[n])
                while left:
                    k = min(left, len(block))
                    f.write(block[:k])
                    left -= k
        weight_map.update({n: fname for n in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(nbytes(s) for s in shapes.values())},
                   "weight_map": weight_map}, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": H, "num_attention_heads": NH, "num_key_value_heads": NKV,
                   "intermediate_size": I, "vocab_size": V, "num_hidden_layers": layers,
                   "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
                   "torch_dtype": "bfloat16"}, f)


# The worker: attaches both ranks, then per line on stdin "refresh" times refresh() of each
# rank and a second (unchanged) refresh, and answers one JSON line. Exits at EOF.
WORKER = r"""
import json, sys, time
import weightd
sock, name = sys.argv[1], sys.argv[2]
try:
    import torch  # noqa: F401
    backend = "torch"
except ImportError:
    backend = "numpy"
c = weightd.Client(sock)
att = [c.attach(name, r, backend=backend) for r in range(int(sys.argv[3]))]
print(json.dumps({"backend": backend, "tensors": len(att[0])}), flush=True)
for line in sys.stdin:
    out = []
    for a in att:
        t0 = time.perf_counter()
        changed = a.refresh()
        t1 = time.perf_counter()
        again = a.refresh()
        t2 = time.perf_counter()
        out.append({"ms": (t1 - t0) * 1e3, "changed": changed, "generation": a.generation,
                    "noop_ms": (t2 - t1) * 1e3, "noop_changed": again})
    print(json.dumps(out), flush=True)
"""


def bf16_dict(shapes, seed):
    """The one-layer update as a trainer holds it: torch.bfloat16 tensors (or ml_dtypes bfloat16
    arrays); None when neither is importable."""
    try:
        import torch
        g = torch.Generator().manual_seed(seed)
        return {n: torch.randn(s, generator=g, dtype=torch.float32).to(torch.bfloat16)
                for n, s in shapes.items()}, "dict of torch.bfloat16 tensors"
    except ImportError:
        pass
    try:
        import ml_dtypes
        rng = np.random.default_rng(seed)
        return {n: rng.standard_normal(s, dtype=np.float32).astype(ml_dtypes.bfloat16)
                for n, s in shapes.items()}, "dict of ml_dtypes.bfloat16 arrays"
    except ImportError:
        return None, None


def vmstat():
    """The /proc/vmstat counters that say whether an operation read from disk (pgpgin, KiB) or
    made the kernel reclaim memory (pgscan_*)."""
    out = {"pgpgin": 0, "pgscan": 0}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k == "pgpgin":
                out["pgpgin"] += int(v)
            elif k.startswith("pgscan_"):
                out["pgscan"] += int(v)
    return out


def warm(d):
    for f in sorted(os.listdir(d)):
        subprocess.run(["cat", os.path.join(d, f)], stdout=subprocess.DEVNULL, check=True)


def stats(xs):
    return min(xs), statistics.median(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--gb", type=float, default=4.0, help="checkpoint size to aim at (GB)")
    ap.add_argument("--layers", type=int, help="decoder layers (overrides --gb)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--keep-previous", action="store_true",
                    help="daemon config keep_previous_generation = true")
    ap.add_argument("--segment-bytes", type=int,
                    help="daemon config arena_segment_bytes (default: the daemon's)")
    ap.add_argument("--work", help="directory for the checkpoints (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    a = ap.parse_args()
    build = os.path.abspath(a.build)
    os.environ.setdefault("WEIGHTD_CLIENT_LIB", os.path.join(build, "client",
                                                             "libweightd_client.so"))
    pypath = os.path.join(ROOT, "client", "python")
    sys.path.insert(0, pypath)
    os.environ["PYTHONPATH"] = pypath + os.pathsep + os.environ.get("PYTHONPATH", "")
    import weightd

    fixed = nbytes((V, H)) * 2 + nbytes((H,))
    per_layer = sum(nbytes(s) for s in layer_shapes(0).values())
    layers = a.layers or max(1, round((a.gb * 1e9 - fixed) / per_layer))
    shapes = model_shapes(layers)
    total = sum(nbytes(s) for s in shapes.values())
    layer0 = layer_shapes(0)
    layer_bytes = sum(nbytes(s) for s in layer0.values())

    work = a.work or tempfile.mkdtemp(prefix="weightd-update-bench-")
    os.makedirs(work, exist_ok=True)
    run = tempfile.mkdtemp(prefix="weightd-update-bench-run-")
    ckpt_a, ckpt_b = os.path.join(work, "A"), os.path.join(work, "B")
    proc = None
    try:
        t0 = time.monotonic()
        for d, seed in ((ckpt_a, 1), (ckpt_b, 2)):
            if not os.path.exists(os.path.join(d, "config.json")):
                shutil.rmtree(d, ignore_errors=True)
                write_checkpoint(d, shapes, layers, seed)
        for d in (ckpt_a, ckpt_b):
            warm(d)
        print(f"checkpoints A and B: {layers} layers of Llama-3-8B shapes, {total / 1e9:.2f} GB "
              f"bf16 each, 4 shards, page cache warm (written/read in "
              f"{time.monotonic() - t0:.0f} s); tp={TP}, host backend, io_threads="
              f"{a.io_threads}, keep_previous_generation={str(a.keep_previous).lower()}, "
              f"{a.rounds} rounds; load average {os.getloadavg()[0]:.1f}")

        sock = os.path.join(run, "weightd.sock")
        cfg = os.path.join(run, "weightd.json")
        with open(cfg, "w") as f:
            cfg_keys = {"socket": sock, "backend": "host", "io_threads": a.io_threads,
                        "keep_previous_generation": a.keep_previous}
            if a.segment_bytes is not None:
                cfg_keys["arena_segment_bytes"] = a.segment_bytes
            json.dump(cfg_keys, f)
        log = open(os.path.join(run, "weightd.log"), "w")
        proc = subprocess.Popen([os.path.join(build, "daemon", "weightd"), "--config", cfg],
                                stderr=log)
        for _ in range(500):
            try:
                c = weightd.Client(sock)
                break
            except weightd.UnavailableError:
                time.sleep(0.02)
        waiter = weightd.Client(sock)

        update, how = bf16_dict(layer0, seed=3)
        if update is None:
            how = "one-layer .safetensors file (no torch or ml_dtypes for a dict)"
            one = os.path.join(work, "layer0")
            if not os.path.exists(os.path.join(one, "config.json")):
                shutil.rmtree(one, ignore_errors=True)
                write_checkpoint(one, layer0, layers, seed=3, shards=1)
            update = one
        name = "bench"
        res = {k: [] for k in ("load", "load_daemon", "load2", "full", "full_daemon", "part",
                               "part_daemon", "refresh0", "refresh1", "noop")}
        # Per operation, summed over the rounds: MB read from disk, pages scanned by reclaim.
        vm = {k: {"pgpgin": 0, "pgscan": 0} for k in ("load", "load2", "full", "part")}

        def count(op, before):
            after = vmstat()
            for k in before:
                vm[op][k] += after[k] - before[k]
        backend = None
        for r in range(a.rounds):
            if name in [m["name"] for m in c.list()]:
                c.unload(name, force=True)
            warm(ckpt_a)
            v0 = vmstat()
            t = time.perf_counter()
            c.load(name, ckpt_a, tp=TP)
            gen, timed_out = waiter.wait_generation(name, 0, timeout=600)
            res["load"].append(time.perf_counter() - t)
            count("load", v0)
            st = c.status(name)
            assert gen == 1 and not timed_out and st["state"] == "ready", st
            res["load_daemon"].append(st["seconds"])

            worker = subprocess.Popen([sys.executable, "-c", WORKER, sock, name, str(TP)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            hello = json.loads(worker.stdout.readline())
            backend = hello["backend"]

            def refresh(expect_gen):
                worker.stdin.write("refresh\n")
                worker.stdin.flush()
                for i, rank in enumerate(json.loads(worker.stdout.readline())):
                    assert rank["changed"] and rank["generation"] == expect_gen, rank
                    assert not rank["noop_changed"], rank
                    res[f"refresh{i}"].append(rank["ms"])
                    res["noop"].append(rank["noop_ms"])

            # The same work at the same memory footprint as the full update below: B loaded as a
            # second model while A is held (a full update also holds generation N while it
            # writes N+1). Then both it and the update start SETTLE s after memory was freed.
            warm(ckpt_b)
            time.sleep(SETTLE)
            v0 = vmstat()
            t = time.perf_counter()
            c.load(name + "-b", ckpt_b, tp=TP)
            gen2, timed_out = waiter.wait_generation(name + "-b", 0, timeout=600)
            res["load2"].append(time.perf_counter() - t)
            count("load2", v0)
            assert gen2 == 1 and not timed_out, gen2
            c.unload(name + "-b", force=True)
            time.sleep(SETTLE)
            v0 = vmstat()
            t = time.perf_counter()
            rep = c.update(name, ckpt_b, wait=True)
            res["full"].append(time.perf_counter() - t)
            count("full", v0)
            res["full_daemon"].append(rep["seconds"])
            assert rep["generation"] == 2 and rep["bytes_read"] == total, rep
            refresh(2)

            v0 = vmstat()
            t = time.perf_counter()
            rep = c.update(name, update, wait=True)
            res["part"].append(time.perf_counter() - t)
            count("part", v0)
            res["part_daemon"].append(rep["seconds"])
            part_rep = rep
            assert rep["generation"] == 3 and rep["bytes_read"] == layer_bytes, rep
            refresh(3)
            worker.stdin.close()
            worker.wait(timeout=60)
            print(f"round {r + 1}: load {res['load'][-1]:.3f} s, full update "
                  f"{res['full'][-1]:.3f} s, one-layer update {res['part'][-1]:.3f} s, refresh "
                  f"rank 0 / rank 1: {res['refresh0'][-2]:.2f} / {res['refresh1'][-2]:.2f} ms "
                  f"(full), {res['refresh0'][-1]:.2f} / {res['refresh1'][-1]:.2f} ms (one layer)",
                  flush=True)

        if "bytes_allocated" in part_rep:
            print(f"\none-layer update: {part_rep['segments_rewritten']} arenas replaced, "
                  f"{part_rep['bytes_allocated'] / 1e9:.3f} GB allocated "
                  f"({part_rep['bytes_allocated'] / total:.1%} of the model), "
                  f"{part_rep['bytes_copied'] / 1e9:.3f} GB copied from the previous generation")
        print(f"\nmodel {total / 1e9:.2f} GB, one layer {layer_bytes / 1e9:.3f} GB "
              f"({layer_bytes / total:.1%} of the bytes); worker backend: {backend}; "
              f"one-layer update from a {how}")
        print(f"{'what':66s} {'min':>11s} {'median':>11s}")
        rows = [
            ("fresh load of A, tp=2 (request -> generation 1)", "load", "s"),
            ("  the daemon's load seconds", "load_daemon", "s"),
            ("fresh load of B as a second model while A is held", "load2", "s"),
            ("full update from checkpoint B (request -> published)", "full", "s"),
            ("  the daemon's update seconds", "full_daemon", "s"),
            ("one-layer update from memory (call -> published)", "part", "s"),
            ("  the daemon's update seconds", "part_daemon", "s"),
            ("refresh() in the worker, rank 0 (refreshed first)", "refresh0", "ms"),
            ("refresh() in the worker, rank 1 (the old generation's last lease)", "refresh1",
             "ms"),
            ("refresh() with nothing new (round trip floor)", "noop", "ms"),
        ]
        for label, key, unit in rows:
            lo, med = stats(res[key])
            print(f"{label:66s} {lo:8.3f} {unit:2s} {med:8.3f} {unit:2s}")
        load_med, full_med = statistics.median(res["load"]), statistics.median(res["full"])
        part_med = statistics.median(res["part"])
        refresh_all = res["refresh0"] + res["refresh1"]
        refresh_med = statistics.median(refresh_all)
        load2_med = statistics.median(res["load2"])
        print(f"\nfull update / fresh load of a second model beside A (medians, same memory "
              f"footprint): {full_med / load2_med:.2f}; round by round: "
              + ", ".join(f"{f / l:.2f}" for f, l in zip(res["full"], res["load2"])))
        print(f"full update / fresh load (medians): {full_med / load_med:.2f}  "
              f"(GB/s: load {total / load_med / 1e9:.2f}, full update "
              f"{total / full_med / 1e9:.2f})")
        print("full update / fresh load, round by round: "
              + ", ".join(f"{f / l:.2f}" for f, l in zip(res["full"], res["load"])))
        print(f"one-layer update / full update (medians): {part_med / full_med:.2f}, "
              f"bytes read {layer_bytes / total:.2f}")
        print(f"target full update <= fresh load (at the same memory footprint): "
              f"{'met' if full_med <= load2_med else 'MISSED'}")
        print(f"target refresh() < 5 ms: {'met' if max(refresh_all) < 5 else 'MISSED'} "
              f"(every refresh: median {refresh_med:.2f} ms, max {max(refresh_all):.2f} ms)")
        print("during the timed operations, all rounds (/proc/vmstat, whole machine): "
              + "; ".join(f"{op}: {v['pgpgin'] / 1024:.0f} MB read from disk, {v['pgscan']} "
                          "pages scanned by reclaim" for op, v in vm.items()))
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        c.unload(name, force=True)
        c.close()
        waiter.close()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        shutil.rmtree(run, ignore_errors=True)
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
