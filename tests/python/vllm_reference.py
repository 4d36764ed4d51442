"""Independent numpy implementation of /work/shared/VLLM_LAYOUT.md (shared/VLLM_LAYOUT.md in the
design docs): given Hugging Face tensors, config, T and rank r, the tensors vLLM holds on rank r.

Written from the layout document alone; it shares no code or tables with the C++ planner.
Tensors are (dtype, ndarray): BF16/F16 as uint16 bit patterns, F32 as float32.
"""
import numpy as np

SKIP = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached", "rotary_pos_emb.inv_freq")


# ---- dtype conversion (round to nearest even, as torch's copy_) --------------------------------

def _f32_to_bf16(a):
    with np.errstate(invalid="ignore", over="ignore"):
        return _f32_to_bf16_impl(a)


def _f32_to_bf16_impl(a):
    bits = a.view(np.uint32)
    lo = bits & np.uint32(0xFFFF0000)
    lo_val = lo.view(np.float32).astype(np.float64)
    # The next bf16 up in magnitude; past the largest finite value it is 2^128 (Inf).
    hi_bits = lo.astype(np.uint64) + 0x10000
    hi_exp_is_inf = ((hi_bits >> 23) & 0xFF) == 0xFF
    hi_val = np.where(hi_exp_is_inf, np.sign(lo_val) * 2.0 ** 128 + 0 * lo_val,
                      (hi_bits.astype(np.uint32)).view(np.float32).astype(np.float64))
    x = a.astype(np.float64)
    dlo, dhi = np.abs(x - lo_val), np.abs(hi_val - x)
    lo_even = ((lo >> 16) & 1) == 0
    take_hi = (dhi < dlo) | ((dhi == dlo) & ~lo_even)
    out = np.where(take_hi, (hi_bits >> 16).astype(np.uint32), (lo >> 16)).astype(np.uint16)
    # Inf and exact values have lo == x: dlo == 0 keeps them. NaN: torch's scalar path gives 0x7FC0.
    out = np.where(np.isnan(a), np.uint16(0x7FC0), out)
    return out.astype(np.uint16)


def _f32_to_f16(a):
    with np.errstate(over="ignore"):
        h = a.astype(np.float16).view(np.uint16)
    sign = ((a.view(np.uint32) >> 16) & 0x8000).astype(np.uint16)
    return np.where(np.isnan(a), sign | np.uint16(0x7E00), h).astype(np.uint16)


def _to_f32(dt, a):
    if dt == "F32":
        return a
    if dt == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    if dt == "F16":
        return a.view(np.float16).astype(np.float32)
    raise ValueError(dt)


def cast(t, to):
    dt, a = t
    if to is None or dt == to:
        return t
    f = _to_f32(dt, a)
    if to == "F32":
        return "F32", f
    if to == "BF16":
        return "BF16", _f32_to_bf16(f)
    return "F16", _f32_to_f16(f)


# ---- layout ----------------------------------------------------------------------------------

def _cat(parts):
    dt = parts[0][0]
    return dt, np.concatenate([p[1] for p in parts], axis=0)


def _rows(t, start, n):
    return t[0], t[1][start:start + n]


def expected_rank(tensors, cfg, T, r, dtype=None, expert_parallel=False):
    """Returns {vLLM parameter name: (dtype, ndarray)} for rank r of T."""
    H = cfg["hidden_size"]
    nH = cfg["num_attention_heads"]
    nKV = cfg.get("num_key_value_heads", nH)
    hd = cfg.get("head_dim", H // nH)
    tie = cfg.get("tie_word_embeddings", False)
    E = cfg.get("num_local_experts", cfg.get("num_experts"))
    left = {n: v for n, v in tensors.items() if not any(s in n for s in SKIP)}
    out = {}

    def take(name):
        return left.pop(name)

    def vocab(t):
        V = t[1].shape[0]
        Vp = -(-V // 64) * 64
        P = Vp // T
        s, e = min(r * P, V), min((r + 1) * P, V)
        real = t[1][s:e]
        pad = np.zeros((P - (e - s),) + t[1].shape[1:], dtype=t[1].dtype)
        return t[0], np.concatenate([real, pad], axis=0)

    out["model.embed_tokens.weight"] = vocab(take("model.embed_tokens.weight"))
    if tie:
        left.pop("lm_head.weight", None)
    else:
        out["lm_head.weight"] = vocab(take("lm_head.weight"))
    out["model.norm.weight"] = take("model.norm.weight")

    q = nH // T * hd
    kv = max(1, nKV // T) * hd
    rep = T // nKV if T >= nKV else 1
    s = r // rep
    layers = cfg["num_hidden_layers"]
    for l in range(layers):
        p = f"model.layers.{l}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                  "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                  "block_sparse_moe.gate.weight", "mlp.gate.weight"):
            if p + n in left:
                out[p + n] = take(p + n)
        for kind in ("weight", "bias"):
            a = p + f"self_attn.q_proj.{kind}"
            if a in left:
                out[p + f"self_attn.qkv_proj.{kind}"] = _cat([
                    _rows(take(a), r * q, q),
                    _rows(take(p + f"self_attn.k_proj.{kind}"), s * kv, kv),
                    _rows(take(p + f"self_attn.v_proj.{kind}"), s * kv, kv)])
        o = take(p + "self_attn.o_proj.weight")
        K = o[1].shape[1]
        out[p + "self_attn.o_proj.weight"] = (o[0], o[1][:, r * K // T:(r + 1) * K // T])
        if p + "mlp.gate_proj.weight" in left:
            g, u = take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
            n = g[1].shape[0] // T
            out[p + "mlp.gate_up_proj.weight"] = _cat([_rows(g, r * n, n), _rows(u, r * n, n)])
            d = take(p + "mlp.down_proj.weight")
            K = d[1].shape[1]
            out[p + "mlp.down_proj.weight"] = (d[0], d[1][:, r * K // T:(r + 1) * K // T])
        for prefix, names in ((p + "block_sparse_moe.experts.", ("w1", "w3", "w2")),
                              (p + "mlp.experts.", ("gate_proj", "up_proj", "down_proj"))):
            if prefix + f"0.{names[0]}.weight" not in left:
                continue
            if expert_parallel:
                base, rem = E // T, E % T
                first, count = r * base + min(r, rem), base + (1 if r < rem else 0)
            else:
                first, count = 0, E
            w13, w2 = [], []
            for e in range(E):
                g = take(prefix + f"{e}.{names[0]}.weight")
                u = take(prefix + f"{e}.{names[1]}.weight")
                d = take(prefix + f"{e}.{names[2]}.weight")
                if not first <= e < first + count:
                    continue
                if expert_parallel:
                    w13.append(np.concatenate([g[1], u[1]], axis=0))
                    w2.append(d[1])
                else:
                    n = g[1].shape[0] // T
                    w13.append(np.concatenate([g[1][r * n:(r + 1) * n], u[1][r * n:(r + 1) * n]], axis=0))
                    w2.append(d[1][:, r * n:(r + 1) * n])
            dt = g[0]
            out[prefix + "w13_weight"] = (dt, np.stack(w13))
            out[prefix + "w2_weight"] = (dt, np.stack(w2))
    if left:
        raise KeyError(f"reference: tensors that map to nothing: {sorted(left)}")
    return {n: cast(t, dtype) for n, t in out.items()}
