"""The Python package `weightd` against the real daemon (host backend) on a temporary socket.

Environment (set by ctest): WEIGHTD_BIN, WEIGHTCTL, WEIGHTD_CLIENT_LIB, PYTHONPATH=client/python.
The references are independent of weightd's code: the checkpoint's own bytes (hf recipe, read
with a few lines of safetensors parsing below) and `weightctl shard` output (llama recipe, T=2).
"""
import contextlib
import gc
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import weightd

HERE = os.path.dirname(os.path.abspath(__file__))


def read_safetensors(path):
    """name -> (dtype, shape, raw bytes), straight from the file format."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            f.seek(base + begin)
            out[name] = (meta["dtype"], tuple(meta["shape"]), f.read(end - begin))
    return out


def read_checkpoint(d):
    out = {}
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors"):
            out.update(read_safetensors(os.path.join(d, fn)))
    return out


def start_daemon(d, config):
    """Starts $WEIGHTD_BIN with `config` (written to d/weightd.json), logging to d/weightd.log;
    returns (process, log file, a connected weightd.Client) once it answers."""
    with open(os.path.join(d, "weightd.json"), "w") as f:
        json.dump(config, f)
    log = open(os.path.join(d, "weightd.log"), "w")
    proc = subprocess.Popen([os.environ["WEIGHTD_BIN"], "--config", os.path.join(d, "weightd.json")],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            return proc, log, weightd.Client(config["socket"])
        except weightd.UnavailableError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.02)


@contextlib.contextmanager
def demo_daemon(prefix):
    """A host-backend daemon in a fresh directory with the demo checkpoint loaded twice: "demo"
    (hf recipe) and "llama2" (T=2). Yields (dir, socket, checkpoint, connected client); stops the
    daemon with SIGTERM afterwards and checks it exits 0."""
    d = tempfile.mkdtemp(prefix=prefix)
    sock = os.path.join(d, "weightd.sock")
    ckpt = os.path.join(d, "demo")
    # The checkpoint writer needs the `safetensors` package; another interpreter may provide it.
    maker = os.environ.get("WEIGHTD_CHECKPOINT_PYTHON", sys.executable)
    subprocess.run([maker, os.path.join(HERE, "make_demo_checkpoint.py"), ckpt],
                   check=True, stdout=subprocess.DEVNULL)
    proc, log, c = start_daemon(d, {"socket": sock, "backend": "host", "io_threads": 2})
    try:
        c.load("demo", ckpt, recipe="hf", wait=True, timeout=60)
        c.load("llama2", ckpt, tp=2, wait=True, timeout=60)
        yield d, sock, ckpt, c
    finally:
        c.close()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        log.close()
        shutil.rmtree(d, ignore_errors=True)
        assert rc == 0, f"weightd exited with {rc}"


@pytest.fixture(scope="module")
def daemon():
    with demo_daemon("weightd-py-") as (d, sock, ckpt, _):
        yield {"dir": d, "socket": sock, "ckpt": ckpt}


def leases(sock, name):
    with weightd.Client(sock) as c:
        return [l for r in c.status(name)["ranks"] for l in r["leases"]]


def test_hf_attach_numpy_equals_checkpoint_bytes(daemon):
    ref = read_checkpoint(daemon["ckpt"])
    w = weightd.attach("demo", socket=daemon["socket"], backend="numpy")
    assert set(w) == set(ref)
    for name, (dtype, shape, raw) in ref.items():
        a = w[name]
        assert isinstance(a, np.ndarray)
        assert a.shape == shape, name
        if dtype == "BF16":
            assert a.dtype == np.uint16, name  # bf16 bit patterns (documented)
        assert a.tobytes() == raw, name


def test_llama_t2_equals_weightctl_shard(daemon):
    out = os.path.join(daemon["dir"], "shard")
    subprocess.run([os.environ["WEIGHTCTL"], "shard", daemon["ckpt"], "--tp", "2", "--out", out],
                   check=True, stdout=subprocess.DEVNULL)
    for rank in (0, 1):
        ref = read_safetensors(os.path.join(out, f"model-rank-{rank}-part-0.safetensors"))
        w = weightd.attach("llama2", rank=rank, socket=daemon["socket"], backend="numpy")
        assert set(w) == set(ref)
        assert any("qkv_proj" in n for n in w)
        for name, (_, shape, raw) in ref.items():
            assert w[name].shape == shape, name
            assert w[name].tobytes() == raw, (rank, name)


def test_numpy_arrays_are_read_only(daemon):
    w = weightd.attach("demo", socket=daemon["socket"], backend="numpy")
    a = w["model.norm.weight"]
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1
    with pytest.raises(ValueError):
        a.flags.writeable = True
    with pytest.raises(ValueError):
        np.add(a, 1, out=a)


def test_tensors_outlive_client_and_hold_lease(daemon):
    sock = daemon["socket"]
    c = weightd.Client(sock)
    w = c.attach("demo", backend="numpy")
    c.close()
    del c
    gc.collect()
    ls = leases(sock, "demo")
    assert [l["pid"] for l in ls] == [os.getpid()]
    with weightd.Client(sock) as c2:
        assert [r["lease_count"] for r in c2.status("demo")["ranks"]] == [1]
    with weightd.Client(sock) as c2:
        with pytest.raises(weightd.FailedPreconditionError) as e:
            c2.unload("demo")
        assert "demo" in e.value.message and e.value.code == 9
    # One array alone keeps the lease; the bytes stay readable.
    keep = w["lm_head.weight"]
    expected = keep.tobytes()
    del w
    gc.collect()
    assert len(leases(sock, "demo")) == 1
    assert keep.tobytes() == expected
    del keep
    gc.collect()
    deadline = time.monotonic() + 5
    while leases(sock, "demo") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leases(sock, "demo") == []


def test_client_list_status_metrics_and_errors(daemon):
    sock = daemon["socket"]
    with weightd.Client(sock) as c:
        assert c.version == 1
        assert {m["name"] for m in c.list()} >= {"demo", "llama2"}
        st = c.status("llama2")
        assert st["state"] == "ready" and st["tp"] == 2 and len(st["ranks"]) == 2
        assert st["backend"] == "host"
        assert "weightd_models" in c.metrics()
        with pytest.raises(weightd.NotFoundError) as e:
            c.status("nope")
        assert "nope" in str(e.value) and e.value.code_name == "NOT_FOUND"
        with pytest.raises(weightd.NotFoundError):
            c.attach("demo", rank=5)
        with pytest.raises(weightd.AlreadyExistsError):
            c.load("demo", daemon["ckpt"])
        with pytest.raises(weightd.InvalidArgumentError) as e:
            c.load("x", daemon["ckpt"], tp="two")
        assert "'tp' must be an integer" in e.value.message
        with pytest.raises(weightd.WeightdError):
            c.attach("demo", backend="jax")
        c.load("tmp", daemon["ckpt"], recipe="hf", wait=True, timeout=60)
        c.unload("tmp")
    with pytest.raises(weightd.UnavailableError) as e:
        weightd.Client(os.path.join(daemon["dir"], "missing.sock"))
    assert "missing.sock" in e.value.message
    assert isinstance(e.value, weightd.WeightdError)


def test_attach_from_concurrent_processes(daemon):
    code = ("import sys, weightd; w = weightd.attach('llama2', rank=int(sys.argv[1]), "
            "socket=sys.argv[2], backend='numpy'); print(len(w), sum(a.nbytes for a in w.values()))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r % 2), daemon["socket"]],
                              stdout=subprocess.PIPE, text=True) for r in range(4)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[2] and outs[1] == outs[3]
    assert int(outs[0][0]) > 0


def test_library_lookup_error_names_the_variable(tmp_path):
    env = dict(os.environ, WEIGHTD_CLIENT_LIB=str(tmp_path / "nope.so"))
    r = subprocess.run([sys.executable, "-c", "import weightd; weightd.Client('/x')"], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "libweightd_client.so not found" in r.stderr and "nope.so" in r.stderr


def test_torch_attach_zero_copy(daemon):
    if os.environ.get("WEIGHTD_REQUIRE_TORCH") == "1":
        import torch  # the suite's torch run: a missing torch is a failure, not a skip
    else:
        torch = pytest.importorskip(
            "torch", reason="torch is not installed for this interpreter; the suite runs this "
            "test under Debian's python3-torch as ctest 'python_client_torch'")
    ref = read_checkpoint(daemon["ckpt"])
    w = weightd.attach("demo", socket=daemon["socket"], backend="torch")
    assert set(w) == set(ref)
    for name, (dtype, shape, raw) in ref.items():
        t = w[name]
        assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
        assert tuple(t.shape) == shape
        if dtype == "BF16":
            assert t.dtype == torch.bfloat16
        assert t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy().tobytes() \
            == raw, name
    keep = w["model.norm.weight"]
    del w, t
    gc.collect()
    assert len(leases(daemon["socket"], "demo")) == 1
    assert keep.float().numel() == 256  # torch reads the mapped bytes after the dict is gone
    del keep
    gc.collect()
    deadline = time.monotonic() + 5
    while leases(daemon["socket"], "demo") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leases(daemon["socket"], "demo") == []
