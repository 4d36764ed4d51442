"""Writes small Hugging Face-style checkpoints for tests: exact HF tensor names, several shards
plus model.safetensors.index.json, config.json, random data.

Tensors are kept in memory as (dtype, ndarray) with dtype in {"BF16", "F16", "F32"}; BF16 and
F16 arrays hold raw uint16 bit patterns (numpy has no bfloat16), F32 arrays are float32.
BF16 is written as U16 and then the header is retagged (see _retag_bf16).
"""
import json
import os

import numpy as np
from safetensors.numpy import save_file

ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def _rand(rng, dtype, shape, special=False):
    if dtype == "BF16":
        return "BF16", rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    if dtype == "F16":
        return "F16", rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    a = (rng.standard_normal(size=shape) * rng.choice([1e-6, 1e-3, 1.0, 3e4, 1e5], size=shape)).astype(np.float32)
    if special and a.size >= 16:
        flat = a.reshape(-1)
        # Values that exercise the casts: NaN, +-Inf, fp16 overflow and its boundary (65520 rounds to
        # Inf, 65519 does not), fp16 subnormals and ties, bf16 ties.
        vals = np.array([np.nan, np.inf, -np.inf, 65520.0, 65519.0, -70000.0, 2.0 ** -25, 3 * 2.0 ** -26,
                         2.0 ** -24, 1e-8, -0.0, 5.96e-8, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -np.nan, 1e38],
                        dtype=np.float32)
        flat[: len(vals)] = vals
    return "F32", a


def make(out_dir, arch="llama", *, H=64, nH=8, nKV=2, head_dim=None, I=96, V=1000, layers=2,
         E=4, Ie=32, dtype="BF16", tie=False, write_lm_head=None, biases=None, shards=3,
         extra=None, drop=(), config_overrides=None, seed=0):
    """Writes a checkpoint and returns (tensors, config). `extra` adds tensors by name → shape;
    `drop` removes names before writing (to make a parameter missing)."""
    rng = np.random.default_rng(seed)
    hd = head_dim if head_dim is not None else H // nH
    moe = arch in ("mixtral", "qwen3_moe")
    if biases is None:
        biases = arch == "qwen2"
    if write_lm_head is None:
        write_lm_head = not tie
    special = dtype == "F32"
    t = {}

    def w(name, *shape):
        t[name] = _rand(rng, dtype, shape, special)

    w("model.embed_tokens.weight", V, H)
    w("model.norm.weight", H)
    if write_lm_head:
        w("lm_head.weight", V, H)
    for l in range(layers):
        p = f"model.layers.{l}."
        w(p + "input_layernorm.weight", H)
        w(p + "post_attention_layernorm.weight", H)
        w(p + "self_attn.q_proj.weight", nH * hd, H)
        w(p + "self_attn.k_proj.weight", nKV * hd, H)
        w(p + "self_attn.v_proj.weight", nKV * hd, H)
        w(p + "self_attn.o_proj.weight", H, nH * hd)
        if biases:
            w(p + "self_attn.q_proj.bias", nH * hd)
            w(p + "self_attn.k_proj.bias", nKV * hd)
            w(p + "self_attn.v_proj.bias", nKV * hd)
        if arch in ("qwen3", "qwen3_moe"):
            w(p + "self_attn.q_norm.weight", hd)
            w(p + "self_attn.k_norm.weight", hd)
        # Old Llama conversions carry this buffer; engines skip it.
        t[p + "self_attn.rotary_emb.inv_freq"] = ("F32", rng.standard_normal(hd // 2).astype(np.float32))
        if arch == "mixtral":
            w(p + "block_sparse_moe.gate.weight", E, H)
            for e in range(E):
                q = f"{p}block_sparse_moe.experts.{e}."
                w(q + "w1.weight", Ie, H)
                w(q + "w3.weight", Ie, H)
                w(q + "w2.weight", H, Ie)
        elif arch == "qwen3_moe":
            w(p + "mlp.gate.weight", E, H)
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                w(q + "gate_proj.weight", Ie, H)
                w(q + "up_proj.weight", Ie, H)
                w(q + "down_proj.weight", H, Ie)
        else:
            w(p + "mlp.gate_proj.weight", I, H)
            w(p + "mlp.up_proj.weight", I, H)
            w(p + "mlp.down_proj.weight", H, I)
    for name, shape in (extra or {}).items():
        w(name, *shape)
    for name in drop:
        del t[name]

    cfg = {"architectures": [ARCHS[arch]], "model_type": arch, "hidden_size": H,
           "num_attention_heads": nH, "num_key_value_heads": nKV, "num_hidden_layers": layers,
           "vocab_size": V, "tie_word_embeddings": tie, "rms_norm_eps": 1e-6,
           "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]}
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if arch == "mixtral":
        cfg.update(num_local_experts=E, intermediate_size=Ie, num_experts_per_tok=2)
    elif arch == "qwen3_moe":
        cfg.update(num_experts=E, moe_intermediate_size=Ie, intermediate_size=I, num_experts_per_tok=2)
    else:
        cfg["intermediate_size"] = I
    cfg.update(config_overrides or {})
    write(out_dir, t, cfg, shards)
    return t, cfg


def write(out_dir, tensors, cfg, shards=3):
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(tensors)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        path = os.path.join(out_dir, fname)
        save_file({n: tensors[n][1] for n in part}, path, metadata={"format": "pt"})
        retag = {n: tensors[n][0] for n in part if tensors[n][0] in ("BF16", "F16")}
        _retag(path, retag)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(a.nbytes for _, a in tensors.values())},
                   "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"do_sample": False}, f)
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "model": {"type": "BPE"}}, f)


def _retag(path, dtypes):
    """Rewrites U16 dtypes of the named tensors as BF16/F16 (same size, same bytes)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        rest = f.read()
    for name, dt in dtypes.items():
        header[name]["dtype"] = dt
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(new).to_bytes(8, "little"))
        f.write(new)
        f.write(rest)


def read_safetensors_raw(path):
    """name -> (dtype, shape, bytes): a reader independent of weightd and of numpy dtypes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = (info["dtype"], list(info["shape"]), data[b:e])
    return out
