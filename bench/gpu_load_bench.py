#!/usr/bin/env python3
"""GPU load benchmark for the H100 machine (MEASURED.md method). Not run yet: no GPU session.

Method: build (once) the Llama-3-8B-shaped bf16 checkpoint exactly as MEASURED.md describes,
then time, warm (page cache) and cold (caches dropped: sync; echo 3 > /proc/sys/vm/drop_caches,
needs root), each loader in a fresh process:
  safetensors.torch.load_file(device="cuda"), safe_open + get_tensor + copy_ into GPU tensors,
  AutoModelForCausalLM.from_pretrained(device_map="cuda"), weightd (weightctl load + wait ready),
and two ceilings: pinned host->device copy bandwidth (256 MiB chunks) and O_DIRECT read
bandwidth of the checkpoint (dd iflag=direct, 1 MiB blocks). Every figure is bytes/s of the
16.06 GB checkpoint; ratios are to the pinned H2D ceiling (warm) and the O_DIRECT ceiling (cold).

Usage: bench/gpu_load_bench.py --build BUILD_DIR --ckpt /tmp/llama3-8b [--cold] [--io-mode M]
"""
import argparse, glob, json, os, subprocess, sys, tempfile, time

def make_checkpoint(d):
    if os.path.exists(os.path.join(d, "config.json")):
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg)
    m.save_pretrained(d, max_shard_size="5GB")

def ckpt_bytes(d):
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(d, "*.safetensors")))

def drop_caches():
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)

def warm(d):
    for f in glob.glob(os.path.join(d, "*.safetensors")):
        subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)

SNIPPETS = {
    "safetensors.load_file(cuda)": """
import glob, sys, torch
from safetensors.torch import load_file
t = {}
for f in sorted(glob.glob(sys.argv[1] + '/*.safetensors')): t.update(load_file(f, device='cuda'))
torch.cuda.synchronize()""",
    "safe_open+copy_": """
import glob, sys, torch
from safetensors import safe_open
out = {}
for f in sorted(glob.glob(sys.argv[1] + '/*.safetensors')):
    with safe_open(f, framework='pt') as s:
        for k in s.keys():
            x = s.get_tensor(k); y = torch.empty_like(x, device='cuda'); y.copy_(x); out[k] = y
torch.cuda.synchronize()""",
    "from_pretrained(cuda)": """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map='cuda', torch_dtype=torch.bfloat16)
torch.cuda.synchronize()""",
}

def time_python(code, d):
    # CUDA context creation is excluded: the snippet is timed inside the process after init.
    wrapped = "import time, torch; torch.zeros(1, device='cuda'); t0 = time.perf_counter()\n" + \
              code + "\nprint(time.perf_counter() - t0)"
    r = subprocess.run([sys.executable, "-c", wrapped, d], capture_output=True, text=True)
    if r.returncode != 0:
        return None, r.stderr[-500:]
    return float(r.stdout.strip().splitlines()[-1]), ""

def pinned_h2d():
    code = """
import torch, time
n = 256 << 20
h = torch.empty(n, dtype=torch.uint8).pin_memory(); d = torch.empty(n, dtype=torch.uint8, device='cuda')
for _ in range(3): d.copy_(h, non_blocking=True)
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(20): d.copy_(h, non_blocking=True)
torch.cuda.synchronize(); print(20 * n / (time.perf_counter() - t0))"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip())

def odirect_read(d):
    drop_caches()
    t0 = time.perf_counter()
    for f in glob.glob(os.path.join(d, "*.safetensors")):
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=1M", "iflag=direct"],
                       capture_output=True, check=True)
    return ckpt_bytes(d) / (time.perf_counter() - t0)

def time_weightd(build, d, io_mode, backend):
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "w.sock")
        cfg = os.path.join(tmp, "w.json")
        json.dump({"socket": sock, "backend": backend, "io_mode": io_mode}, open(cfg, "w"))
        p = subprocess.Popen([f"{build}/daemon/weightd", "--config", cfg])
        try:
            for _ in range(100):
                if os.path.exists(sock): break
                time.sleep(0.05)
            ctl = [f"{build}/client/weightctl"]
            env = {**os.environ, "WEIGHTD_SOCKET": sock}
            t0 = time.perf_counter()
            subprocess.run(ctl + ["load", "m", d, "--devices", "0", "--wait"], check=True, env=env)
            secs = time.perf_counter() - t0
            st = subprocess.run(ctl + ["status", "--json"], capture_output=True, text=True,
                                env=env)
            return secs, st.stdout[-400:]
        finally:
            p.terminate(); p.wait()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--ckpt", default="/tmp/llama3-8b")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--io-mode", default="auto")
    ap.add_argument("--backend", default="cuda")
    a = ap.parse_args()
    make_checkpoint(a.ckpt)
    n = ckpt_bytes(a.ckpt)
    ceil_h2d = pinned_h2d()
    print(f"checkpoint {n / 1e9:.2f} GB; pinned H2D ceiling {ceil_h2d / 1e9:.1f} GB/s")
    if a.cold:
        ceil_disk = odirect_read(a.ckpt)
        print(f"O_DIRECT read ceiling (dd, 1 MiB) {ceil_disk / 1e9:.2f} GB/s")
    ceiling = ceil_disk if a.cold else ceil_h2d
    runs = [(k, lambda k=k: time_python(SNIPPETS[k], a.ckpt)) for k in SNIPPETS]
    runs.append((f"weightd ({a.backend}, io_mode {a.io_mode})",
                 lambda: time_weightd(a.build, a.ckpt, a.io_mode, a.backend)))
    for name, fn in runs:
        drop_caches() if a.cold else warm(a.ckpt)
        secs, note = fn()
        if secs is None:
            print(f"{name:45s} FAILED {note}")
            continue
        print(f"{name:45s} {secs:7.2f} s  {n / secs / 1e9:6.2f} GB/s  "
              f"({n / secs / ceiling * 100:.0f}% of ceiling)")

if __name__ == "__main__":
    main()
