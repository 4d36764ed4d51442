#!/usr/bin/env python3
"""Writes a small Llama-shaped Hugging Face checkpoint (3 shards + index + config.json).

Usage: make_demo_checkpoint.py OUT_DIR [--f32] [--seed N]

The tensors are random bf16-as-uint16 bit patterns with exact HF names, so every tool of weightd
can run on it without downloading anything. With --f32 they are float32 values (normally
distributed, so a cast to bf16/fp16 rounds real numbers) and config.json says float32. With
--seed N (default 0) the values are drawn from another seed, same names and shapes, for tests
that need several distinct models.
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

H, NH, NKV, I, V, LAYERS = 256, 8, 2, 512, 1000, 2
HD = H // NH


def tensors(rng, f32=False):
    def w(*shape):
        if f32:
            return rng.standard_normal(size=shape, dtype=np.float32)
        # bf16 is stored as its raw 16-bit pattern; numpy has no bfloat16.
        return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)

    out = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": w(H), "lm_head.weight": w(V, H)}
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        out.update({
            p + "input_layernorm.weight": w(H),
            p + "post_attention_layernorm.weight": w(H),
            p + "self_attn.q_proj.weight": w(NH * HD, H),
            p + "self_attn.k_proj.weight": w(NKV * HD, H),
            p + "self_attn.v_proj.weight": w(NKV * HD, H),
            p + "self_attn.o_proj.weight": w(H, NH * HD),
            p + "mlp.gate_proj.weight": w(I, H),
            p + "mlp.up_proj.weight": w(I, H),
            p + "mlp.down_proj.weight": w(H, I),
        })
    return out


def main():
    out_dir = sys.argv[1]
    f32 = "--f32" in sys.argv[2:]
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv[2:] else 0
    os.makedirs(out_dir, exist_ok=True)
    data = tensors(np.random.default_rng(seed), f32)
    names = sorted(data.keys())
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # safetensors.numpy writes U16; retag the header as BF16 by saving through raw bytes.
        save_file({n: data[n] for n in shard}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        if not f32:
            _retag_bf16(os.path.join(out_dir, fname))
        weight_map.update({n: fname for n in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.nbytes for v in data.values())},
                   "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
                   "num_attention_heads": NH, "num_key_value_heads": NKV, "intermediate_size": I,
                   "vocab_size": V, "num_hidden_layers": LAYERS, "tie_word_embeddings": False,
                   "torch_dtype": "float32" if f32 else "bfloat16", "rms_norm_eps": 1e-5}, f, indent=2)


def _retag_bf16(path):
    """Rewrites the dtype of every U16 tensor in the header as BF16 (same size, same bytes)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        new = header.replace(b'"dtype":"U16"', b'"dtype":"BF16"')
        # "BF16" is one byte longer than "U16": the header grows, so the file is rewritten.
        rest = f.read()
    pad = (8 - (len(new) % 8)) % 8
    new += b" " * pad
    with open(path, "wb") as f:
        f.write(len(new).to_bytes(8, "little"))
        f.write(new)
        f.write(rest)


if __name__ == "__main__":
    main()
