"""End-to-end tests of `weightctl shard` / `weightctl plan`: every byte of every output tensor is
compared with vllm_reference.py (an independent implementation of VLLM_LAYOUT.md), and the
user-facing error cases are checked by exit code and message.

Run: WEIGHTCTL=build/client/weightctl python3 -m pytest tests/python
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import hf_checkpoints as hf
import vllm_reference as ref

WEIGHTCTL = os.environ.get("WEIGHTCTL", "weightctl")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args):
    return subprocess.run([WEIGHTCTL, *map(str, args)], capture_output=True, text=True)


def shard_and_compare(tmp_path, tensors, cfg, ckpt, T, dtype=None, ep=False, extra_args=()):
    out = tmp_path / f"out-tp{T}-{dtype}-{ep}"
    args = ["shard", ckpt, "--tp", T, "--out", out, *extra_args]
    if dtype:
        args += ["--dtype", {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}[dtype]]
    if ep:
        args.append("--expert-parallel")
    p = run(*args)
    assert p.returncode == 0, p.stderr
    assert "read" in p.stdout and "GB/s" in p.stdout
    for r in range(T):
        got = hf.read_safetensors_raw(out / f"model-rank-{r}-part-0.safetensors")
        want = ref.expected_rank(tensors, cfg, T, r, dtype=dtype, expert_parallel=ep)
        assert sorted(got) == sorted(want), f"rank {r}: names differ"
        for name, (wdt, warr) in want.items():
            gdt, gshape, gbytes = got[name]
            assert gdt == wdt, f"rank {r} {name}: dtype {gdt} != {wdt}"
            assert gshape == list(warr.shape), f"rank {r} {name}: shape {gshape} != {list(warr.shape)}"
            wbytes = np.ascontiguousarray(warr).tobytes()
            if gbytes != wbytes:
                g = np.frombuffer(gbytes, dtype=np.uint8)
                w = np.frombuffer(wbytes, dtype=np.uint8)
                bad = np.nonzero(g != w)[0]
                pytest.fail(f"rank {r} {name}: {len(bad)} bytes differ, first at byte {bad[0]}")
    for side in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / side).read_bytes() == (ckpt / side).read_bytes()
    assert not [n for n in os.listdir(out) if n.startswith(".")], "temporaries left behind"
    return out


# ---- correctness against the reference ---------------------------------------------------------

@pytest.mark.parametrize("T", [1, 2, 4, 8])
def test_llama_gqa_vocab_padding(tmp_path, T):
    # nKV = 2 < T for T = 4, 8: kv heads replicated; V = 1000 is not a multiple of 64.
    ckpt = tmp_path / "llama"
    t, cfg = hf.make(ckpt, "llama", H=64, nH=8, nKV=2, V=1000)
    shard_and_compare(tmp_path, t, cfg, ckpt, T)


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_write_the_same_bytes(tmp_path, threads):
    # The read pipeline's workers write disjoint pieces of the rank files in parallel; 16 MiB
    # units with 2 layers of H = 1024 make several units per run.
    ckpt = tmp_path / "llama"
    t, cfg = hf.make(ckpt, "llama", H=1024, nH=8, nKV=2, I=4096, V=8192, layers=2, shards=2)
    shard_and_compare(tmp_path, t, cfg, ckpt, 2, extra_args=("--threads", threads))
    shard_and_compare(tmp_path, t, cfg, ckpt, 4, dtype="F32", extra_args=("--threads", threads))


def test_bad_thread_count(tmp_path):
    ckpt = tmp_path / "llama"
    hf.make(ckpt, "llama", H=64, nH=8, nKV=2, V=1000)
    p = run("shard", ckpt, "--tp", 2, "--threads", 0, "--out", tmp_path / "out")
    assert p.returncode == 2 and "--threads" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("T", [1, 2, 4])
def test_qwen2_biases_tied_embeddings(tmp_path, T):
    ckpt = tmp_path / "qwen2"
    t, cfg = hf.make(ckpt, "qwen2", H=64, nH=4, nKV=2, V=1001, tie=True, write_lm_head=True)
    out = shard_and_compare(tmp_path, t, cfg, ckpt, T)
    assert "lm_head.weight" not in hf.read_safetensors_raw(out / "model-rank-0-part-0.safetensors")


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_qwen3_head_dim_fp32_cast(tmp_path, dtype):
    # head_dim 32 != hidden 64 / heads 4; fp32 source with NaN, Inf, overflow, subnormals.
    ckpt = tmp_path / "qwen3"
    t, cfg = hf.make(ckpt, "qwen3", H=64, nH=4, nKV=2, head_dim=32, V=777, dtype="F32")
    for T in (2, 4):
        shard_and_compare(tmp_path, t, cfg, ckpt, T, dtype=dtype)


def test_bf16_to_fp16_and_fp32(tmp_path):
    ckpt = tmp_path / "llama-bf16"
    t, cfg = hf.make(ckpt, "llama", H=64, nH=4, nKV=4, V=640)
    shard_and_compare(tmp_path, t, cfg, ckpt, 2, dtype="F16")
    shard_and_compare(tmp_path, t, cfg, ckpt, 2, dtype="F32")


@pytest.mark.parametrize("ep", [False, True])
@pytest.mark.parametrize("T", [2, 4])
def test_mixtral(tmp_path, T, ep):
    ckpt = tmp_path / "mixtral"
    t, cfg = hf.make(ckpt, "mixtral", H=64, nH=4, nKV=2, V=1000, E=4, Ie=32)
    shard_and_compare(tmp_path, t, cfg, ckpt, T, ep=ep)


@pytest.mark.parametrize("ep", [False, True])
def test_qwen3_moe(tmp_path, ep):
    # E = 6 over T = 4 in expert-parallel mode: ranks hold 2, 2, 1, 1 experts.
    ckpt = tmp_path / "qwen3moe"
    t, cfg = hf.make(ckpt, "qwen3_moe", H=64, nH=8, nKV=4, head_dim=16, V=1000, E=6, Ie=32, tie=True)
    shard_and_compare(tmp_path, t, cfg, ckpt, 4, ep=ep)


def test_single_rank_and_plan_json(tmp_path):
    ckpt = tmp_path / "llama"
    t, cfg = hf.make(ckpt, "llama", H=64, nH=8, nKV=2, V=1000)
    out = tmp_path / "r3"
    p = run("shard", ckpt, "--tp", 4, "--rank", 3, "--out", out)
    assert p.returncode == 0, p.stderr
    assert os.listdir(out).count("model-rank-3-part-0.safetensors") == 1
    assert not (out / "model-rank-0-part-0.safetensors").exists()
    p = run("plan", ckpt, "--tp", 4, "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    # Replicated KV heads and replicated norms are read once: the plan reads exactly the
    # checkpoint minus the skipped inv_freq buffers.
    skipped = sum(a.nbytes for n, (_, a) in t.items() if "inv_freq" in n)
    total = sum(a.nbytes for _, a in t.values())
    assert plan["read_bytes"] == total - skipped
    assert plan["checkpoint_bytes"] == total
    for rank in plan["ranks"]:
        assert all(tg["offset"] % 256 == 0 for tg in rank["targets"])
    assert run("plan", ckpt, "--tp", 4, "--json").stdout == p.stdout  # deterministic
    human = run("plan", ckpt, "--tp", 4)
    assert "qkv_proj" in human.stdout and "reads" in human.stdout


# ---- recipes -----------------------------------------------------------------------------------

def test_docs_recipe_example(tmp_path):
    """The worked example of docs/RECIPES.md: a made-up architecture described by a recipe file."""
    recipe = os.path.join(REPO, "docs", "examples", "recipe-example.json")
    ckpt = tmp_path / "toy"
    t, cfg = hf.make(ckpt / "unused", "llama", H=64, nH=4, nKV=2, V=500, I=64)
    # The made-up "Wren" architecture names its tensors differently; map them back for the
    # reference, which speaks Hugging Face Llama names.
    to_wren = {
        "model.embed_tokens.weight": "wren.token_table",
        "lm_head.weight": "wren.unembed",
        "model.norm.weight": "wren.out_norm.scale",
    }
    for l in range(cfg["num_hidden_layers"]):
        for a, b in [("input_layernorm.weight", "pre_norm.scale"),
                     ("post_attention_layernorm.weight", "mid_norm.scale"),
                     ("self_attn.q_proj.weight", "attn.wq"), ("self_attn.k_proj.weight", "attn.wk"),
                     ("self_attn.v_proj.weight", "attn.wv"), ("self_attn.o_proj.weight", "attn.wo"),
                     ("mlp.gate_proj.weight", "ffn.w_gate"), ("mlp.up_proj.weight", "ffn.w_up"),
                     ("mlp.down_proj.weight", "ffn.w_down"),
                     ("self_attn.rotary_emb.inv_freq", "attn.rope_cache")]:
            to_wren[f"model.layers.{l}.{a}"] = f"wren.blocks.{l}.{b}"
    wren = {to_wren[n]: v for n, v in t.items()}
    wcfg = dict(cfg, architectures=["WrenForCausalLM"], model_type="wren", wren_layers=cfg["num_hidden_layers"])
    del wcfg["num_hidden_layers"]
    hf.write(ckpt, wren, wcfg)
    p = run("plan", ckpt, "--tp", 2)
    assert p.returncode != 0 and "WrenForCausalLM" in p.stderr and "--recipe" in p.stderr
    ref_cfg = dict(cfg)
    shard_and_compare(tmp_path, t, ref_cfg, ckpt, 2, extra_args=["--recipe", recipe])


# ---- errors a user can act on ------------------------------------------------------------------

def test_unmapped_tensor_then_skip(tmp_path):
    ckpt = tmp_path / "vlm"
    t, cfg = hf.make(ckpt, "llama", extra={"model.norm_mean": (3,), "model.norm_std": (3,)})
    p = run("plan", ckpt, "--tp", 2)
    assert p.returncode == 1
    assert "model.norm_mean" in p.stderr and "model.norm_std" in p.stderr
    assert "nearest parameter names" in p.stderr and "model.norm.weight" in p.stderr
    assert "--skip" in p.stderr
    for k in ("model.norm_mean", "model.norm_std"):
        del t[k]
    shard_and_compare(tmp_path, t, cfg, ckpt, 2, extra_args=["--skip", "norm_mean", "--skip", "norm_std"])


def test_missing_parameters_listed(tmp_path):
    ckpt = tmp_path / "missing"
    hf.make(ckpt, "llama", drop=["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"])
    p = run("plan", ckpt, "--tp", 2)
    assert p.returncode == 1
    assert "model.layers.1.self_attn.qkv_proj.weight" in p.stderr
    assert "model.layers.1.self_attn.k_proj.weight" in p.stderr
    assert "model.layers.0.mlp.gate_up_proj.weight" in p.stderr
    assert "model.layers.0.mlp.up_proj.weight" in p.stderr


def test_shape_mismatch(tmp_path):
    ckpt = tmp_path / "shape"
    hf.make(ckpt, "llama", I=96, config_overrides={"intermediate_size": 128})
    p = run("plan", ckpt, "--tp", 1)
    assert p.returncode == 1
    assert "model.layers.0.mlp.down_proj.weight" in p.stderr or "mlp.gate_proj.weight" in p.stderr
    assert "[96, 64]" in p.stderr or "[64, 96]" in p.stderr
    assert "intermediate_size" in p.stderr and "128" in p.stderr


@pytest.mark.parametrize("kw,T,ep,needle", [
    (dict(nH=8, nKV=2), 3, False, "num_attention_heads"),
    (dict(nH=12, nKV=3, H=96), 2, False, "num_key_value_heads"),
    (dict(nH=8, nKV=8, I=100), 8, False, "intermediate_size"),
])
def test_tp_does_not_divide(tmp_path, kw, T, ep, needle):
    ckpt = tmp_path / "div"
    hf.make(ckpt, "llama", **kw)
    p = run("plan", ckpt, "--tp", T)
    assert p.returncode == 1
    assert needle in p.stderr and f"--tp {T}" in p.stderr


def test_tp_experts(tmp_path):
    ckpt = tmp_path / "moe"
    hf.make(ckpt, "mixtral", nH=8, nKV=8, E=4, Ie=32)
    p = run("plan", ckpt, "--tp", 8, "--expert-parallel")
    assert p.returncode == 1 and "num_experts" in p.stderr
    hf.make(ckpt, "mixtral", nH=8, nKV=8, E=4, Ie=36)
    p = run("plan", ckpt, "--tp", 8)
    assert p.returncode == 1 and "intermediate" in p.stderr and "--tp 8" in p.stderr


def test_unsupported_architecture(tmp_path):
    ckpt = tmp_path / "foo"
    hf.make(ckpt, "llama", config_overrides={"architectures": ["FooForCausalLM"]})
    p = run("plan", ckpt, "--tp", 1)
    assert p.returncode == 1
    for needle in ("FooForCausalLM", "LlamaForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM", "--recipe"):
        assert needle in p.stderr


def test_bad_recipe_file_names_rule(tmp_path):
    ckpt = tmp_path / "llama"
    hf.make(ckpt, "llama")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"extends": "llama", "params": [{"source": "x.{l}", "style": "diagonal"}]}))
    p = run("plan", ckpt, "--tp", 1, "--recipe", bad)
    assert p.returncode == 1
    assert "bad.json" in p.stderr and "params[0]" in p.stderr and "diagonal" in p.stderr


# ---- a failed run leaves the output directory as it found it -----------------------------------

def run_fsize_limited(fsize, *args, ignore_sigxfsz=True):
    """weightctl under RLIMIT_FSIZE = `fsize` bytes: growing a file past it fails with EFBIG, the
    way a full disk fails with ENOSPC. With `ignore_sigxfsz` False, SIGXFSZ keeps its default
    action (kill with a core), so weightctl must ignore it itself."""
    def limit():
        if ignore_sigxfsz:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return subprocess.run([WEIGHTCTL, *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit)


def snapshot(d):
    """Every entry under `d` (hidden ones included) with its bytes; None when `d` is absent."""
    if not d.exists():
        return None
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else "dir")
            for p in sorted(d.rglob("*"))}


def populated_out_dir(out):
    """An output directory holding an unrelated file and a previous run's outputs."""
    out.mkdir()
    (out / "notes.txt").write_text("not weightctl's\n")
    (out / "config.json").write_text('{"previous": "run"}')
    (out / "model-rank-0-part-0.safetensors").write_bytes(b"a previous run's rank 0")
    return out


def big_tokenizer(ckpt):
    """A tokenizer.json larger than any rank file of the test checkpoints (400 kB)."""
    (ckpt / "tokenizer.json").write_text(json.dumps({"version": "1.0", "pad": "x" * 400_000}))


@pytest.mark.parametrize("ignore_sigxfsz", [True, False],
                         ids=["sigxfsz-ignored", "sigxfsz-default"])
@pytest.mark.parametrize("populated", [False, True], ids=["new-dir", "populated-dir"])
def test_disk_full_writing_a_rank_file(tmp_path, populated, ignore_sigxfsz):
    # 64 kB is less than a rank file (about 190 kB): the first rank file cannot be written.
    ckpt = tmp_path / "llama"
    hf.make(ckpt, "llama", H=64, nH=8, nKV=2, V=1000)
    out = populated_out_dir(tmp_path / "out") if populated else tmp_path / "out"
    before = snapshot(out)
    p = run_fsize_limited(64 << 10, "shard", ckpt, "--tp", 2, "--out", out,
                          ignore_sigxfsz=ignore_sigxfsz)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "model-rank-0-part-0.safetensors" in p.stderr and "File too large" in p.stderr, p.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize("populated", [False, True], ids=["new-dir", "populated-dir"])
def test_disk_full_copying_tokenizer(tmp_path, populated):
    # 300 kB holds every rank file (about 190 kB each) but not the 400 kB tokenizer.json.
    ckpt = tmp_path / "llama"
    hf.make(ckpt, "llama", H=64, nH=8, nKV=2, V=1000)
    big_tokenizer(ckpt)
    out = populated_out_dir(tmp_path / "out") if populated else tmp_path / "out"
    before = snapshot(out)
    p = run_fsize_limited(300 << 10, "shard", ckpt, "--tp", 2, "--out", out)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "tokenizer.json" in p.stderr and "File too large" in p.stderr, p.stderr
    assert snapshot(out) == before
    # Without the limit the same run succeeds, replacing a previous run's files.
    p = run("shard", ckpt, "--tp", 2, "--out", out)
    assert p.returncode == 0, p.stderr
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert (out / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()
    want = ["config.json", "generation_config.json", "model-rank-0-part-0.safetensors",
            "model-rank-1-part-0.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(out)) == sorted(want + (["notes.txt"] if populated else []))
    if populated:
        assert (out / "notes.txt").read_text() == "not weightctl's\n"


def test_failed_rename_rolls_back(tmp_path):
    # A directory where rank 1's file goes: the config files and rank 0 are already renamed into
    # place when rank 1's rename fails, and must be taken back (the previous run's restored).
    ckpt = tmp_path / "llama"
    hf.make(ckpt, "llama", H=64, nH=8, nKV=2, V=1000)
    out = populated_out_dir(tmp_path / "out")
    (out / "model-rank-1-part-0.safetensors").mkdir()
    (out / "model-rank-1-part-0.safetensors" / "keep").write_text("x")
    before = snapshot(out)
    p = run("shard", ckpt, "--tp", 2, "--out", out)
    assert p.returncode == 1, p.stderr
    assert "model-rank-1-part-0.safetensors" in p.stderr and "Is a directory" in p.stderr, p.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_removes_temporaries(tmp_path, sig):
    # Large enough (about 100 MB, converted to fp32) that the signal lands while the output is
    # being written: it is sent as soon as the first new file appears in the output directory.
    ckpt = tmp_path / "llama"
    hf.make(ckpt, "llama", H=1024, nH=8, nKV=2, I=4096, V=8192, layers=2, shards=1)
    out = populated_out_dir(tmp_path / "out")
    before = snapshot(out)
    proc = subprocess.Popen([WEIGHTCTL, "shard", ckpt, "--tp", "2", "--dtype", "fp32",
                             "--out", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if set(os.listdir(out)) - set(before):
            proc.send_signal(sig)
            break
        time.sleep(0.001)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == -sig, (proc.returncode, err)
    assert "interrupted" in err, err
    assert snapshot(out) == before
