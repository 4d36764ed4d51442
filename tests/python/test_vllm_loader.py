"""The vLLM load format "weightd" and its refit extension against the real vLLM (CPU build) and
the real daemon (host backend, temporary socket).

Run with the interpreter of scripts/install-vllm.sh's venv. Environment (set by ctest):
WEIGHTD_BIN, WEIGHTCTL, WEIGHTD_CLIENT_LIB, PYTHONPATH=client/python. Without vLLM the tests
skip, unless WEIGHTD_REQUIRE_VLLM=1 (CI), where they fail. WEIGHTD_VLLM_TESTS=quick runs Llama
at T=1 only.

Every vLLM start is a child process (vllm_run.py): greedy decoding, 16 tokens, bfloat16, eager.
References are vLLM's own: its default loader on the same checkpoint, and the parameters that
loader leaves on each rank before CPU repacking (the plugin vllm_capture_plugin.py).
"""
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:
    import torch  # noqa: F401
    import vllm  # noqa: F401
    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

if not HAVE_VLLM:
    if os.environ.get("WEIGHTD_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"WEIGHTD_REQUIRE_VLLM=1 but {sys.executable} cannot import vllm "
                           "(bash scripts/install-vllm.sh)")
    pytest.skip("vllm is not importable (bash scripts/install-vllm.sh, then run with its venv)",
                allow_module_level=True)

import hf_checkpoints  # noqa: E402
import vllm_reference  # noqa: E402
import weightd  # noqa: E402

QUICK = os.environ.get("WEIGHTD_VLLM_TESTS") == "quick"
PROMPTS = [[1, 5, 17, 42, 99, 7], [300, 2, 2, 451, 12, 8, 9, 100, 33, 64, 5], [77]]
MAX_TOKENS = 16

# Small checkpoints of each family (hf_checkpoints.py names), sized for vLLM's CPU kernels (head
# dims 32/64) and T=2: Llama with GQA, Qwen2 with tied embeddings and q/k/v biases, Qwen3 with an
# explicit head_dim unlike hidden/heads, and two MoE families. V=500 pads the vocabulary to 512.
ARCHS = {
    "llama": dict(H=128, nH=4, nKV=2, I=256, V=500, layers=2),
    "qwen2": dict(H=128, nH=4, nKV=2, I=256, V=500, layers=2, tie=True),
    "qwen3": dict(H=128, nH=4, nKV=2, head_dim=64, I=256, V=500, layers=2),
    "qwen3_moe": dict(H=128, nH=4, nKV=2, head_dim=32, I=256, V=500, layers=2, E=4, Ie=64),
    "mixtral": dict(H=128, nH=4, nKV=2, V=500, layers=2, E=4, Ie=128),
}


def make_checkpoint(out_dir, arch, seed=0):
    """Writes a bf16 checkpoint of `arch` with values a model can run on (hf_checkpoints' random
    bit patterns would be NaNs): normal weights of scale 0.08, norms near 1."""
    tensors, cfg = hf_checkpoints.make(os.path.join(out_dir, ".f32"), arch, dtype="F32", shards=1,
                                       seed=seed, **ARCHS[arch])
    shutil.rmtree(os.path.join(out_dir, ".f32"))
    rng = np.random.default_rng(1000 + seed)
    out = {}
    for name, (dt, a) in tensors.items():
        if "rotary_emb" in name:
            out[name] = (dt, a)
            continue
        if name.endswith("norm.weight"):
            v = 1.0 + 0.1 * rng.standard_normal(a.shape)
        else:
            v = 0.08 * rng.standard_normal(a.shape)
        out[name] = vllm_reference.cast(("F32", v.astype(np.float32)), "BF16")
    cfg["torch_dtype"] = "bfloat16"
    cfg["max_position_embeddings"] = 512
    hf_checkpoints.write(out_dir, out, cfg, shards=2)
    return out_dir


def declared_plugins():
    """The `vllm.general_plugins` entry points of client/python/pyproject.toml."""
    import tomllib

    with open(os.path.join(HERE, "..", "..", "client", "python", "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["entry-points"]["vllm.general_plugins"]


# ---- the daemon --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env():
    """A host-backend daemon on a temporary socket; the checkpoints; the PYTHONPATH on which
    vLLM's processes find the weightd package and the capture plugin."""
    d = tempfile.mkdtemp(prefix="weightd-vllm-")
    sock = os.path.join(d, "weightd.sock")
    with open(os.path.join(d, "weightd.json"), "w") as f:
        json.dump({"socket": sock, "backend": "host", "io_threads": 2}, f)
    log = open(os.path.join(d, "weightd.log"), "w")
    proc = subprocess.Popen([os.environ["WEIGHTD_BIN"], "--config", os.path.join(d, "weightd.json")],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            client = weightd.Client(sock)
            break
        except weightd.UnavailableError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.02)
    # The package's plugin entry point, as client/python/pyproject.toml declares it (so that the
    # package need not be pip-installed into vLLM's venv: PYTHONPATH serves this checkout), and
    # the capture plugin, discoverable by importlib.metadata in every vLLM process.
    plugins = os.path.join(d, "plugins")
    dist = os.path.join(plugins, "weightd_vllm_test_plugins-0.dist-info")
    os.makedirs(dist)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: weightd-vllm-test-plugins\nVersion: 0\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        f.write("[vllm.general_plugins]\n")
        f.write("".join(f"{k} = {v}\n" for k, v in declared_plugins().items()))
        f.write("weightd_test_capture = vllm_capture_plugin:register\n")
    pythonpath = os.pathsep.join([p for p in [os.environ.get("PYTHONPATH", ""), HERE, plugins] if p])
    e = {"dir": d, "socket": sock, "client": client, "pythonpath": pythonpath, "cache": {}}
    try:
        yield e
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        log.close()
        if rc == 0:
            shutil.rmtree(d, ignore_errors=True)
        assert rc == 0, f"weightd exited with {rc} (log: {d}/weightd.log)"


def checkpoint(env, arch, seed=0):
    path = os.path.join(env["dir"], f"{arch}-{seed}")
    if not os.path.isdir(path):
        make_checkpoint(path, arch, seed)
    return path


def run_vllm(env, job, expect_fail=False, capture_dir=None):
    """Runs vllm_run.py with `job`; returns its result dict, or (with expect_fail) its output."""
    tag = f"run{len(os.listdir(env['dir']))}"
    job_path = os.path.join(env["dir"], tag + ".json")
    result_path = os.path.join(env["dir"], tag + ".result.json")
    with open(job_path, "w") as f:
        json.dump({"prompts": PROMPTS, "max_tokens": MAX_TOKENS, **job}, f)
    child_env = dict(os.environ, PYTHONPATH=env["pythonpath"], WEIGHTD_SOCKET=env["socket"],
                     VLLM_CPU_OMP_THREADS_BIND="|".join(["0-1"] * job.get("tp", 1)
                                                        if job.get("tp", 1) > 1 else ["auto"]),
                     TOKENIZERS_PARALLELISM="false")
    if capture_dir:
        child_env["WEIGHTD_VLLM_CAPTURE_DIR"] = capture_dir
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, os.path.join(HERE, "vllm_run.py"), job_path, result_path],
                       env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=900)
    wall = time.monotonic() - t0
    if expect_fail:
        assert p.returncode != 0, "vLLM started although a failure was expected"
        return p.stdout
    if p.returncode != 0:
        print(p.stdout[-20000:])
        raise AssertionError(f"vLLM exited with {p.returncode} for {job}")
    with open(result_path) as f:
        result = json.load(f)
    result["wall"] = wall
    print(f"vLLM {job.get('load_format')} {os.path.basename(job['model'])} tp={job.get('tp', 1)}: "
          f"{wall:.1f} s ({result['seconds']})")
    return result


def default_run(env, arch, tp, seed=0):
    """vLLM's own loader (with the capture plugin): tokens, logprobs and the captured params."""
    key = ("default", arch, tp, seed)
    if key not in env["cache"]:
        cap = os.path.join(env["dir"], f"capture-{arch}-{seed}-tp{tp}")
        r = run_vllm(env, {"model": checkpoint(env, arch, seed), "load_format": "weightd_capture",
                           "tp": tp}, capture_dir=cap)
        r["capture"] = cap
        env["cache"][key] = r
    return env["cache"][key]


def weightd_run(env, arch, tp, seed=0, **job):
    return run_vllm(env, {"model": checkpoint(env, arch, seed), "load_format": "weightd",
                          "tp": tp, "extension": True, **job})


def metric(client, name):
    m = re.search(rf"^{name} (\S+)$", client.metrics(), re.M)
    return float(m.group(1))


CASES = [("llama", 1)] if QUICK else [
    ("llama", 1), ("qwen2", 1), ("qwen3", 1), ("qwen3_moe", 1), ("mixtral", 1),
    ("llama", 2), ("qwen2", 2), ("qwen3", 2), ("qwen3_moe", 2), ("mixtral", 2)]


# ---- tests -------------------------------------------------------------------------------------

def test_package_declares_the_plugin():
    """What vLLM discovers once the package is installed: register() adds the load format."""
    assert declared_plugins() == {"weightd": "weightd.vllm:register"}
    import weightd.vllm
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.config.load import LoadConfig

    weightd.vllm.register()
    weightd.vllm.register()  # vLLM may call it more than once
    loader = get_model_loader(LoadConfig(load_format="weightd",
                                         model_loader_extra_config={"model": "m"}))
    assert isinstance(loader, weightd.vllm.WeightdModelLoader)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sockett'\]"):
        get_model_loader(LoadConfig(load_format="weightd",
                                    model_loader_extra_config={"sockett": "/x"}))


@pytest.mark.parametrize("arch,tp", CASES, ids=[f"{a}-tp{t}" for a, t in CASES])
def test_generation_equals_default_loader(env, arch, tp):
    ref = default_run(env, arch, tp)
    got = weightd_run(env, arch, tp)
    assert got["runs"][0]["tokens"] == ref["runs"][0]["tokens"]
    assert got["runs"][0]["logprobs"] == ref["runs"][0]["logprobs"]
    assert len(got["info"]) == tp
    for info in got["info"]:
        assert info["zero_copy"] > 0, info
        if arch in ("qwen3_moe", "mixtral"):
            assert info["cloned"] == 2 * ARCHS[arch]["layers"], info  # w13, w2 per layer
        else:
            assert info["cloned"] == 0, info


@pytest.mark.parametrize("arch,tp", CASES, ids=[f"{a}-tp{t}" for a, t in CASES])
def test_daemon_bytes_equal_vllm_parameters(env, arch, tp):
    """What the daemon serves for each rank equals, byte for byte, what vLLM's own loader put in
    each parameter (before CPU repacking): names (modulo .routed_experts.), shapes, dtypes."""
    from safetensors.torch import load_file

    ref = default_run(env, arch, tp)
    name = f"check-{arch}-tp{tp}"
    env["client"].load(name, checkpoint(env, arch), tp=tp, dtype="bf16", wait=True, timeout=120)

    def compare(r):  # a function, so that the attached tensors are gone when it returns
        vllm_params = load_file(os.path.join(ref["capture"], f"rank-{r}.safetensors"))
        served = env["client"].attach(name, r, backend="torch")
        mapped = {n.replace(".routed_experts.", ".", 1): t for n, t in vllm_params.items()}
        assert sorted(mapped) == sorted(served), (r, sorted(set(mapped) ^ set(served)))
        for n, t in mapped.items():
            s = served[n]
            assert (s.dtype, tuple(s.shape)) == (t.dtype, tuple(t.shape)), (r, n)
            assert torch.equal(s.contiguous().view(torch.int16), t.view(torch.int16)), (r, n)
        return len(mapped)

    try:
        for r in range(tp):
            assert compare(r) > 0
    finally:
        gc.collect()
        env["client"].unload(name)


def test_second_start_attaches(env):
    first = weightd_run(env, "llama", 1)  # loads (or attaches, after the parity test)
    read = metric(env["client"], "weightd_checkpoint_bytes_read_total")
    loads = metric(env["client"], "weightd_loads_total")
    second = weightd_run(env, "llama", 1)
    assert metric(env["client"], "weightd_checkpoint_bytes_read_total") == read
    assert metric(env["client"], "weightd_loads_total") == loads
    assert second["runs"][0] == first["runs"][0]
    assert second["info"][0]["model"] == first["info"][0]["model"]


@pytest.mark.parametrize("arch,tp", [("llama", 1)] if QUICK else
                         [("llama", 1), ("qwen3_moe", 1), ("qwen2", 2)])
def test_refit_equals_fresh_vllm_on_the_new_checkpoint(env, arch, tp):
    """Start on A through weightd, `update` the daemon's model to B (same shapes, other values),
    refresh every worker: the tokens equal a fresh vLLM on B, and so do the logprobs at T=1.

    At T=2 vLLM's CPU build is not bitwise repeatable from one generate() call to the next in
    one process, whatever the loader (its default loader, 10 calls with the same prompts: same
    tokens, logprobs differing by up to ~2e-2 in most calls), and the generation after a refit
    is a process's second; there the logprobs are compared within 5e-2."""
    a = default_run(env, arch, tp, seed=0)
    b = default_run(env, arch, tp, seed=1)
    assert a["runs"][0]["tokens"] != b["runs"][0]["tokens"]
    model = f"refit-{arch}-tp{tp}"
    got = weightd_run(env, arch, tp, extra={"model": model, "checkpoint": checkpoint(env, arch)},
                      refit={"checkpoint": checkpoint(env, arch, seed=1), "socket": env["socket"]})
    try:
        assert got["runs"][0] == a["runs"][0]
        assert [r["changed"] for r in got["refresh"]] == [True] * tp
        assert got["info_after"][0]["generation"] == got["info"][0]["generation"] + 1
        assert got["runs"][1]["tokens"] == b["runs"][0]["tokens"]
        if tp == 1:
            assert got["runs"][1]["logprobs"] == b["runs"][0]["logprobs"]
        else:
            for x, y in zip(got["runs"][1]["logprobs"], b["runs"][0]["logprobs"]):
                assert np.allclose(x, y, rtol=0, atol=5e-2), (x, y)
    finally:
        env["client"].unload(model, force=True)


def test_mismatch_fails_start_naming_parameter_and_shapes(env):
    """A daemon model whose layout differs from vLLM's (here: Llama's weights under the qwen3
    checkpoint's config) stops vLLM's start with the parameter, both shapes and the remedy."""
    other = f"mismatch-llama"
    env["client"].load(other, checkpoint(env, "llama"), dtype="bf16", wait=True, timeout=120)
    try:
        out = run_vllm(env, {"model": checkpoint(env, "qwen3"), "load_format": "weightd",
                             "extra": {"model": other}}, expect_fail=True)
        assert "does not match vLLM's Qwen3ForCausalLM" in out, out[-5000:]
        assert ("'model.layers.0.self_attn.qkv_proj.weight': daemon "
                "'model.layers.0.self_attn.qkv_proj.weight' [256, 128] bfloat16, "
                "vLLM [512, 128] bfloat16") in out, out[-5000:]
        assert "missing: vLLM parameter 'model.layers.0.self_attn.q_norm.weight'" in out
        assert "recipe_file" in out
    finally:
        env["client"].unload(other, force=True)


def test_unknown_option_fails_start(env):
    out = run_vllm(env, {"model": checkpoint(env, "llama"), "load_format": "weightd",
                         "extra": {"sockett": "/x"}}, expect_fail=True)
    assert "unknown key(s) ['sockett']" in out, out[-5000:]


@pytest.mark.skipif(QUICK, reason="WEIGHTD_VLLM_TESTS=quick")
def test_alias_option_makes_moe_experts_zero_copy(env):
    """"alias" binds the fused-MoE experts to the daemon's read-only memory too. vLLM's CPU MoE
    processing only reads them (it prepacks into new tensors): same tokens, nothing cloned; a
    write would have faulted."""
    ref = default_run(env, "qwen3_moe", 1)
    got = weightd_run(env, "qwen3_moe", 1, extra={"alias": [".experts."]})
    assert got["runs"][0] == ref["runs"][0]
    assert got["info"][0]["cloned"] == 0, got["info"]
