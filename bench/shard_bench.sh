#!/usr/bin/env bash
# Throughput and peak RSS of `weightctl shard --tp 4` on a generated ~4 GB Llama-shaped bf16
# checkpoint (H 4096, nH 32, nKV 8, I 14336, V 32000, 8 layers, 4 shards + index).
#
# Method: generate the checkpoint, read it once so it sits in the page cache, then run
# `/usr/bin/time -v weightctl shard --tp 4` and report its own bytes/s line plus the maximum
# resident set size. Output and checkpoint are deleted at the end (set KEEP=1 to keep them).
#
# Usage: bench/shard_bench.sh [BUILD_DIR] [WORK_DIR]
set -euo pipefail
BUILD=${1:-build}
WORK=${2:-/tmp/wd_shard_bench}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
trap '[[ "${KEEP:-0}" == 1 ]] || rm -rf "$WORK"' EXIT

python3 - "$WORK/ckpt" "$HERE/../tests/python" <<'PY'
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np
import hf_checkpoints as hf

rng = np.random.default_rng(0)
block = rng.integers(0, 1 << 16, size=1 << 24, dtype=np.uint16)  # 32 MiB of random bf16 bits

def w(*shape):
    n = int(np.prod(shape))
    return "BF16", np.resize(block, n).reshape(shape)  # tiled: cheap to make, still not all zero

H, NH, NKV, HD, I, V, L = 4096, 32, 8, 128, 14336, 32000, 8
t = {"model.embed_tokens.weight": w(V, H), "lm_head.weight": w(V, H), "model.norm.weight": w(H)}
for l in range(L):
    p = f"model.layers.{l}."
    t.update({p + "input_layernorm.weight": w(H), p + "post_attention_layernorm.weight": w(H),
              p + "self_attn.q_proj.weight": w(NH * HD, H), p + "self_attn.k_proj.weight": w(NKV * HD, H),
              p + "self_attn.v_proj.weight": w(NKV * HD, H), p + "self_attn.o_proj.weight": w(H, NH * HD),
              p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H),
              p + "mlp.down_proj.weight": w(H, I)})
cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": H, "num_attention_heads": NH,
       "num_key_value_heads": NKV, "intermediate_size": I, "vocab_size": V, "num_hidden_layers": L,
       "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
hf.write(sys.argv[1], t, cfg, shards=4)
PY

du -sh "$WORK/ckpt"
cat "$WORK"/ckpt/*.safetensors > /dev/null   # warm the page cache
echo "--- weightctl shard --tp 4"
/usr/bin/time -v "$BUILD/client/weightctl" shard "$WORK/ckpt" --tp 4 --out "$WORK/out" 2> "$WORK/time.txt"
grep -E "Maximum resident set size|Elapsed \(wall clock\)|Percent of CPU" "$WORK/time.txt"
du -sh "$WORK/out"
