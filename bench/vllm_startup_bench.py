"""vLLM start-up: its default loader against --load-format weightd (model already resident).

Method. Writes a Llama-shaped bf16 checkpoint of about 2 GB (hidden 2048, 16 heads of 128, 8 kv
heads, intermediate 5632, 18 layers, vocabulary 32000; two safetensors shards), starts a
host-backend weightd on a temporary socket and loads the model there once (not timed: the
resident state every later start sees). Then, alternating, ROUNDS times each: a fresh process
runs `vllm.LLM(model, load_format=..., dtype=bfloat16, enforce_eager=True)` and generates one
token from a 16-token prompt. Per start it records, timed inside the worker by a wrapper loader
that this script registers as a vLLM plugin ("bench_auto" around vLLM's DefaultModelLoader,
"bench_weightd" around weightd.vllm.WeightdModelLoader):
  - load_weights: the weights themselves (default: read the safetensors and copy them into the
    parameters; weightd: attach the rank and bind the parameters);
  - load_model: that plus building the model and vLLM's process_weights_after_loading (on CPU,
    the oneDNN repacking of every linear layer, whichever loader);
and the time to first token, from the process's first line (before `import vllm`) to the first
token. The default loader runs twice per round: with the checkpoint in the page cache (its best
case) and "cold", after evict() drops the checkpoint's pages. Reports the medians of the rounds, both loaders in the same run.

    WEIGHTD_BIN=build/daemon/weightd WEIGHTD_CLIENT_LIB=build/client/libweightd_client.so \\
    PYTHONPATH=client/python ~/.cache/weightd/venv-vllm/bin/python bench/vllm_startup_bench.py [--rounds 3]
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

HERE = os.path.dirname(os.path.abspath(__file__))

SHAPE = dict(H=2048, nH=16, nKV=8, I=5632, V=32000, layers=18)


def write_checkpoint(out):
    import numpy as np
    import torch
    from safetensors.torch import save_file

    H, nH, nKV, I, V, L = (SHAPE[k] for k in ("H", "nH", "nKV", "I", "V", "layers"))
    hd = H // nH
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = w(V, H)
    shards[1]["lm_head.weight"] = w(V, H)
    shards[1]["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    for l in range(L):
        p = f"model.layers.{l}."
        s = shards[l % 2]
        s[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        s[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        s[p + "self_attn.q_proj.weight"] = w(nH * hd, H)
        s[p + "self_attn.k_proj.weight"] = w(nKV * hd, H)
        s[p + "self_attn.v_proj.weight"] = w(nKV * hd, H)
        s[p + "self_attn.o_proj.weight"] = w(H, nH * hd)
        s[p + "mlp.gate_proj.weight"] = w(I, H)
        s[p + "mlp.up_proj.weight"] = w(I, H)
        s[p + "mlp.down_proj.weight"] = w(H, I)
    os.makedirs(out, exist_ok=True)
    weight_map, total = {}, 0
    for i, s in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(s, os.path.join(out, fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in s})
        total += sum(t.numel() * 2 for t in s.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": H, "num_attention_heads": nH, "num_key_value_heads": nKV,
                   "intermediate_size": I, "num_hidden_layers": L, "vocab_size": V,
                   "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"}, f)
    del np
    return total


PLUGIN = '''
import json, os, time

def register():
    from vllm.model_executor.model_loader import DefaultModelLoader, register_model_loader
    from weightd.vllm import WeightdModelLoader
    import dataclasses

    def timed(base, fmt):
        class Timed(base):
            def __init__(self, load_config):
                if base is DefaultModelLoader:
                    load_config = dataclasses.replace(load_config, load_format="auto")
                super().__init__(load_config)

            def load_weights(self, *a, **k):
                t0 = time.perf_counter()
                super().load_weights(*a, **k)
                self.load_weights_s = time.perf_counter() - t0

            def load_model(self, *a, **k):
                t0 = time.perf_counter()
                model = super().load_model(*a, **k)
                with open(os.environ["BENCH_TIMES"], "w") as f:
                    json.dump({"load_model": time.perf_counter() - t0,
                               "load_weights": self.load_weights_s}, f)
                return model
        register_model_loader(fmt)(Timed)

    timed(DefaultModelLoader, "bench_auto")
    timed(WeightdModelLoader, "bench_weightd")
'''

RUN = '''
import time
T0 = time.perf_counter()
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    fmt, model, name = sys.argv[1], sys.argv[2], sys.argv[3]
    extra = {"model": name} if fmt == "bench_weightd" else {}
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
              max_model_len=512, kv_cache_memory_bytes=256 << 20, load_format=fmt,
              model_loader_extra_config=extra)
    out = llm.generate([{"prompt_token_ids": list(range(1, 17))}],
                       SamplingParams(temperature=0, max_tokens=1, detokenize=False),
                       use_tqdm=False)
    print("FIRST_TOKEN", json.dumps({"seconds": time.perf_counter() - T0,
                                     "token": out[0].outputs[0].token_ids[0]}))
'''


def evict(ckpt):
    """Drops the checkpoint's pages from the page cache (POSIX_FADV_DONTNEED on each file: clean
    pages of these files only), so that the next default-loader start reads the disk."""
    for fn in os.listdir(ckpt):
        fd = os.open(os.path.join(ckpt, fn), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    d = args.dir or tempfile.mkdtemp(prefix="weightd-vllm-bench-")
    os.makedirs(d, exist_ok=True)
    ckpt = os.path.join(d, "llama-2g")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        nbytes = write_checkpoint(ckpt)
    else:
        nbytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)
                     if f.endswith(".safetensors"))
    print(f"checkpoint: {ckpt}, {nbytes / 1e9:.2f} GB")
    plugins = os.path.join(d, "plugins")
    dist = os.path.join(plugins, "weightd_vllm_bench-0.dist-info")
    os.makedirs(dist, exist_ok=True)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: weightd-vllm-bench\nVersion: 0\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        f.write("[vllm.general_plugins]\nweightd_bench = weightd_vllm_bench_plugin:register\n")
    with open(os.path.join(plugins, "weightd_vllm_bench_plugin.py"), "w") as f:
        f.write(PLUGIN)
    run_py = os.path.join(d, "run.py")
    with open(run_py, "w") as f:
        f.write(RUN)

    sock = os.path.join(d, "weightd.sock")
    with open(os.path.join(d, "weightd.json"), "w") as f:
        json.dump({"socket": sock, "backend": "host"}, f)
    log = open(os.path.join(d, "weightd.log"), "w")
    daemon = subprocess.Popen([os.environ["WEIGHTD_BIN"], "--config",
                               os.path.join(d, "weightd.json")], stdout=log, stderr=log)
    import weightd

    try:
        for _ in range(500):
            try:
                c = weightd.Client(sock)
                break
            except weightd.UnavailableError:
                time.sleep(0.02)
        t0 = time.monotonic()
        st = c.load("bench", ckpt, tp=1, dtype="bf16", wait=True)
        print(f"daemon load (not timed below): {time.monotonic() - t0:.2f} s, "
              f"{st['bytes_total'] / 1e9:.2f} GB")
        env = dict(os.environ, WEIGHTD_SOCKET=sock,
                   PYTHONPATH=os.pathsep.join([os.environ.get("PYTHONPATH", ""), plugins]))
        results = {"bench_auto": [], "bench_auto (cold)": [], "bench_weightd": []}
        for r in range(args.rounds):
            for key in results:
                fmt = key.split()[0]
                if key.endswith("(cold)"):
                    evict(ckpt)
                times = os.path.join(d, f"times-{fmt}.json")
                p = subprocess.run([sys.executable, run_py, fmt, ckpt, "bench"],
                                   env=dict(env, BENCH_TIMES=times), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
                line = [l for l in p.stdout.splitlines() if l.startswith("FIRST_TOKEN")]
                if p.returncode != 0 or not line:
                    print(p.stdout[-8000:])
                    raise SystemExit(f"{key} failed")
                first = json.loads(line[0].split(" ", 1)[1])
                with open(times) as f:
                    t = json.load(f)
                results[key].append((t["load_weights"], t["load_model"], first["seconds"],
                                     first["token"]))
                print(f"round {r} {key}: load_weights {t['load_weights']:.2f} s, load_model "
                      f"{t['load_model']:.2f} s, first token {first['seconds']:.2f} s "
                      f"(token {first['token']})")
        print("\n| loader | load_weights | load_model (+ init, post-processing) | "
              "time to first token |")
        print("|---|---|---|---|")
        for key, rs in results.items():
            med = [statistics.median(x[i] for x in rs) for i in range(3)]
            print(f"| {key.replace('bench_', '')} | {med[0]:.2f} s | {med[1]:.2f} s | "
                  f"{med[2]:.2f} s |")
        tokens = {x[3] for rs in results.values() for x in rs}
        print(f"first tokens: {sorted(tokens)} (one value: both loaders agree)")
        del c
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        log.close()
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
