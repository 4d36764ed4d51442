"""Live weight updates end to end: the real weightd (host backend), a Python "trainer" that
publishes new tensors with Client.update(), Python workers attached to both ranks of a T=2 model.

What a worker sees is compared with vllm_reference.py (an independent numpy implementation of
VLLM_LAYOUT.md: fused qkv_proj / gate_up_proj, TP slices, vocab padding, casts) applied to the
checkpoint's tensors with the trainer's new ones substituted, so the daemon's update plan is
checked by code that shares nothing with it.

1. numpy: an F32 checkpoint loaded with dtype=bf16 (the update casts as the load did), updated
   from a dict of numpy float32 arrays (numpy has no bfloat16 without ml_dtypes).
2. torch: a BF16 checkpoint updated from a dict of torch.bfloat16 tensors (one of them not
   contiguous); the torch tensors made by attach(), and numpy views of them, show the new bytes
   after refresh() at the same addresses. Skipped without torch (the suite runs this file a
   second time under Debian's python3-torch, where it must not skip).
3. A trainer process killed with SIGKILL while its update (sent with wait) runs: nothing is
   published, the generation serves on, and the next update works.

Environment (set by ctest): WEIGHTD_BIN, WEIGHTD_CLIENT_LIB, PYTHONPATH=client/python,
WEIGHTD_CHECKPOINT_PYTHON (an interpreter with `safetensors` to write checkpoints, when this one
lacks it), WEIGHTD_REQUIRE_TORCH=1 (the torch run).
"""
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

import vllm_reference as ref
import weightd

HERE = os.path.dirname(os.path.abspath(__file__))
T = 2
# The small Llama of hf_checkpoints.make's defaults: H 64, 8 heads of 8, 2 KV heads (one per
# rank at T=2), I 96, V 1000 (padded to 1024: 512 rows per rank), 2 layers.
SMALL = {"H": 64, "nH": 8, "nKV": 2, "I": 96, "V": 1000, "layers": 2}

_WRITER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import hf_checkpoints as hf
hf.make(sys.argv[2], "llama", **json.loads(sys.argv[3]))
"""


def torch_or_skip():
    if os.environ.get("WEIGHTD_REQUIRE_TORCH") == "1":
        import torch  # the suite's torch run: a missing torch is a failure, not a skip
        return torch
    return pytest.importorskip("torch", reason="torch is not installed for this interpreter; "
                               "ctest runs this file again as python_update_e2e_torch")


def write_checkpoint(path, **kw):
    """hf_checkpoints.make(path, "llama", **kw), in an interpreter that has `safetensors`;
    returns (tensors, config) as read back from the files: {name: (dtype, ndarray)} with BF16
    as uint16 bit patterns, the form vllm_reference takes."""
    try:
        import safetensors  # noqa: F401
        maker = sys.executable
    except ImportError:
        maker = os.environ.get("WEIGHTD_CHECKPOINT_PYTHON")
        if not maker:
            pytest.skip("no interpreter with `safetensors` (WEIGHTD_CHECKPOINT_PYTHON)")
    subprocess.run([maker, "-c", _WRITER, HERE, path, json.dumps(kw)], check=True)
    tensors = {}
    for fn in sorted(os.listdir(path)):
        if not fn.endswith(".safetensors"):
            continue
        with open(os.path.join(path, fn), "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = f.read()
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            b, e = meta["data_offsets"]
            np_dtype = {"BF16": "<u2", "F16": "<u2", "F32": "<f4"}[meta["dtype"]]
            a = np.frombuffer(data[b:e], dtype=np_dtype).reshape(meta["shape"])
            tensors[name] = (meta["dtype"], a)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return tensors, cfg


def start_daemon(d, config):
    with open(os.path.join(d, "weightd.json"), "w") as f:
        json.dump(config, f)
    log = open(os.path.join(d, "weightd.log"), "w")
    proc = subprocess.Popen([os.environ["WEIGHTD_BIN"], "--config",
                             os.path.join(d, "weightd.json")], stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            return proc, log, weightd.Client(config["socket"])
        except weightd.UnavailableError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.02)


@pytest.fixture(scope="module")
def daemon():
    """A host-backend weightd keeping the previous generation; yields {dir, socket}."""
    d = tempfile.mkdtemp(prefix="weightd-update-e2e-")
    sock = os.path.join(d, "weightd.sock")
    proc, log, c = start_daemon(d, {"socket": sock, "backend": "host", "io_threads": 2,
                                    "keep_previous_generation": True})
    c.close()
    try:
        yield {"dir": d, "socket": sock}
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        log.close()
        with open(os.path.join(d, "weightd.log")) as f:
            tail = f.read()[-4000:]
        shutil.rmtree(d, ignore_errors=True)
        assert rc == 0, f"weightd exited with {rc}:\n{tail}"


@contextlib.contextmanager
def loaded(daemon, name, ckpt, **kw):
    """`name` loaded from `ckpt` at T=2 for the test's duration; a connected Client."""
    c = weightd.Client(daemon["socket"])
    try:
        c.load(name, ckpt, tp=T, wait=True, timeout=120, **kw)
        yield c
    finally:
        gc.collect()
        c.unload(name, force=True)
        c.close()


def expected(tensors, cfg, dtype=None):
    """{rank: {vLLM name: raw bytes}} from vllm_reference."""
    return {r: {n: np.ascontiguousarray(a).tobytes()
                for n, (_, a) in ref.expected_rank(tensors, cfg, T, r, dtype=dtype).items()}
            for r in range(T)}


def as_bytes(x):
    """Raw bytes of an attached numpy array or torch tensor."""
    if isinstance(x, np.ndarray):
        return x.tobytes()
    import torch
    return x.view(torch.uint8 if x.element_size() == 1 else torch.int16).numpy().tobytes()


def assert_shows(attachment, want, what):
    assert sorted(attachment) == sorted(want), f"{what}: names differ"
    bad = [n for n, b in want.items() if as_bytes(attachment[n]) != b]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def substituted(tensors, new):
    out = dict(tensors)
    out.update(new)
    return out


class Waiter(threading.Thread):
    """wait_generation(name, after) on a Client of its own; .result once it returns."""

    def __init__(self, sock, name, after):
        super().__init__(daemon=True)
        self.client = weightd.Client(sock)
        self.args = (name, after)
        self.result = None
        self.error = None
        self.start()

    def run(self):
        try:
            self.result = self.client.wait_generation(*self.args, timeout=60)
        except Exception as e:  # noqa: BLE001: reported by the test
            self.error = e
        finally:
            self.client.close()


QKV0 = "model.layers.0.self_attn.qkv_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"


def qkv_rows(cfg):
    """(q rows, kv rows) of one rank's fused qkv_proj at T=2."""
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_attention_heads"] // T * hd, max(1, cfg["num_key_value_heads"] // T) * hd


def test_numpy_update_wakes_waiters_and_refresh_shows_it_in_place(daemon):
    ckpt = os.path.join(daemon["dir"], "f32")
    tensors, cfg = write_checkpoint(ckpt, dtype="F32", seed=1, **SMALL)
    before = expected(tensors, cfg, dtype="BF16")
    with loaded(daemon, "np", ckpt, dtype="bf16") as c:
        worker = weightd.Client(daemon["socket"])
        w = [worker.attach("np", r, backend="numpy") for r in range(T)]
        stale = weightd.Client(daemon["socket"]).attach("np", 0, backend="numpy")
        for r in range(T):
            assert w[r].generation == 1
            assert_shows(w[r], before[r], f"rank {r} generation 1")
        held = [dict(a) for a in w]  # the array objects a worker keeps between steps
        addresses = [{n: a.__array_interface__["data"][0] for n, a in h.items()} for h in held]

        rng = np.random.default_rng(7)
        new = {n: rng.standard_normal(tensors[n][1].shape).astype(np.float32)
               for n in (K0, "model.layers.1.mlp.up_proj.weight", "model.norm.weight")}
        waiter = Waiter(daemon["socket"], "np", 1)
        time.sleep(0.1)  # the wait is in the daemon before the update starts (not required)
        reply = weightd.Client(daemon["socket"]).update("np", new)
        assert reply["name"] == "np" and reply["generation"] == 2 and reply["state"] == "ready"
        assert reply["bytes_read"] == sum(a.nbytes for a in new.values())
        assert reply["ranks_rewritten"] == T
        # Per rank: layer 0's qkv_proj (k is a part of it), layer 1's gate_up_proj, the norm.
        assert reply["targets_rewritten"] == 3 * T
        assert reply["targets_copied"] == T * len(w[0]) - 3 * T
        waiter.join(timeout=30)
        assert waiter.error is None, waiter.error
        assert waiter.result == (2, False)

        after = expected(substituted(tensors, {n: ("F32", a) for n, a in new.items()}), cfg,
                         dtype="BF16")
        # Nothing moves under a worker until it refreshes.
        for r in range(T):
            assert w[r].generation == 1
            assert_shows(w[r], before[r], f"rank {r} before its refresh")
        for r in range(T):
            assert w[r].refresh() is True
            assert w[r].generation == 2
            for n, a in held[r].items():
                assert w[r][n] is a, n
                assert a.__array_interface__["data"][0] == addresses[r][n], n
            assert_shows(held[r], after[r], f"rank {r} generation 2 (the arrays held)")
            # The fused qkv_proj: q and v rows as before, this rank's k head new.
            q, kv = qkv_rows(cfg)
            row = held[r][QKV0].shape[1] * 2
            fused_before, fused_now = before[r][QKV0], held[r][QKV0].tobytes()
            assert fused_now[:q * row] == fused_before[:q * row], f"rank {r}: q rows changed"
            assert fused_now[q * row:(q + kv) * row] != fused_before[q * row:(q + kv) * row]
            assert fused_now[(q + kv) * row:] == fused_before[(q + kv) * row:], f"rank {r}: v"
            assert w[r].refresh() is False
        # The attachment that did not refresh still maps generation 1.
        assert stale.generation == 1
        assert_shows(stale, before[0], "the attachment that did not refresh")
        st = c.status("np")
        assert (st["generation"], st["previous_generation"]) == (2, 1)
        gens = sorted(lease["generation"] for lease in st["ranks"][0]["leases"])
        assert gens == [1, 2], st["ranks"][0]["leases"]

        # A rollback publishes generation 1's weights as 3; a refresh brings them back in place.
        assert c.rollback("np") == 3
        for r in range(T):
            assert w[r].refresh() is True and w[r].generation == 3
            assert_shows(held[r], before[r], f"rank {r} after the rollback")
        assert stale.refresh() is True and stale.generation == 3
        assert_shows(stale, before[0], "the stale attachment refreshed to 3")
        del w, held, stale
        worker.close()


def test_torch_update_refresh_keeps_the_tensor_objects(daemon):
    torch = torch_or_skip()
    ckpt = os.path.join(daemon["dir"], "bf16")
    tensors, cfg = write_checkpoint(ckpt, dtype="BF16", seed=2, **SMALL)
    before = expected(tensors, cfg)
    with loaded(daemon, "pt", ckpt) as c:
        w = [c.attach("pt", r, backend="torch") for r in range(T)]
        stale = weightd.Client(daemon["socket"]).attach("pt", 1, backend="torch")
        for r in range(T):
            assert w[r][QKV0].dtype == torch.bfloat16
            assert_shows(w[r], before[r], f"rank {r} generation 1")
        held = [dict(a) for a in w]
        ptrs = [{n: t.data_ptr() for n, t in h.items()} for h in held]
        # numpy views of the torch tensors, made before the update, see the new bytes too.
        np_views = [h[QKV0].view(torch.int16).numpy() for h in held]

        # What a trainer has: bfloat16 values (not random bit patterns, so no NaN).
        gen = torch.Generator().manual_seed(8)
        new = {n: torch.randn(tensors[n][1].shape, generator=gen).to(torch.bfloat16)
               for n in ("model.layers.0.self_attn.q_proj.weight",
                         "model.layers.0.self_attn.v_proj.weight",
                         "model.layers.1.self_attn.o_proj.weight", "lm_head.weight")}
        bits = {n: t.view(torch.int16).numpy().view(np.uint16).copy() for n, t in new.items()}

        def bf16(a):
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)

        # A non-contiguous tensor of the right shape: the memfd builder gathers it.
        v0 = "model.layers.0.self_attn.v_proj.weight"
        new[v0] = bf16(np.ascontiguousarray(bits[v0].T)).t()
        assert not new[v0].is_contiguous()
        waiter = Waiter(daemon["socket"], "pt", 1)
        reply = weightd.Client(daemon["socket"]).update("pt", new)
        assert (reply["generation"], reply["state"]) == (2, "ready")
        assert reply["bytes_read"] == sum(a.nbytes for a in bits.values())
        # Per rank: layer 0's qkv_proj (q and v), layer 1's o_proj, lm_head.
        assert reply["targets_rewritten"] == 3 * T
        waiter.join(timeout=30)
        assert waiter.result == (2, False), waiter.error

        after = expected(substituted(tensors, {n: ("BF16", a) for n, a in bits.items()}), cfg)
        for r in range(T):
            assert w[r].refresh() is True and w[r].generation == 2
            for n, t in held[r].items():
                assert w[r][n] is t and t.data_ptr() == ptrs[r][n], n
            assert_shows(held[r], after[r], f"rank {r} generation 2 (the tensors held)")
            assert np_views[r].tobytes() == after[r][QKV0], f"rank {r}: the numpy view"
            q, kv = qkv_rows(cfg)
            row = held[r][QKV0].shape[1] * 2
            fused_before = before[r][QKV0]
            assert after[r][QKV0][:q * row] != fused_before[:q * row]
            assert after[r][QKV0][q * row:(q + kv) * row] == fused_before[q * row:(q + kv) * row]
            assert after[r][QKV0][(q + kv) * row:] != fused_before[(q + kv) * row:]
            # Torch computes with the new weights through the same tensor object: this rank's
            # q rows are rows r*q .. (r+1)*q of the trainer's q_proj.
            x = torch.linspace(-1, 1, held[r][QKV0].shape[1])
            q_new = new["model.layers.0.self_attn.q_proj.weight"][r * q:(r + 1) * q]
            assert torch.equal(held[r][QKV0][:q].float() @ x, q_new.float() @ x)
        assert stale.generation == 1
        assert_shows(stale, before[1], "the attachment that did not refresh")
        del w, held, stale, np_views


_TRAINER = r"""
import sys
import numpy as np
import weightd
sock, name, v, h = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tensors = {"model.embed_tokens.weight": np.full((v, h), 0.5, np.float32),
           "lm_head.weight": np.full((v, h), -0.25, np.float32)}
c = weightd.Client(sock)
print("sending", flush=True)
c.update(name, tensors, wait=True)
print("published", flush=True)
"""


def test_trainer_killed_during_its_update_publishes_nothing(daemon):
    # Big enough that the update (read 262 MB of float32 from the memfd, cast to bf16, T=2)
    # takes a while on a small machine: embeddings of 32000 x 1024.
    v, h = 32000, 1024
    ckpt = os.path.join(daemon["dir"], "big")
    write_checkpoint(ckpt, dtype="F32", seed=3, H=h, nH=8, nKV=2, I=256, V=v, layers=1,
                     shards=2)
    with loaded(daemon, "big", ckpt, dtype="bf16") as c:
        w = [c.attach("big", r, backend="numpy") for r in range(T)]
        before = [{n: a.tobytes() for n, a in w[r].items()} for r in range(T)]
        generation = 1
        caught = None
        for attempt in range(5):
            trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, daemon["socket"], "big",
                                        str(v), str(h)], stdout=subprocess.PIPE, text=True)
            try:
                # Kill it as soon as the daemon shows its update running.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and trainer.poll() is None:
                    u = c.status("big").get("update", {})
                    if u.get("state") == "running" and u.get("generation") == generation + 1:
                        trainer.send_signal(signal.SIGKILL)
                        break
            finally:
                trainer.wait(timeout=60)
                trainer.stdout.close()
            while c.status("big").get("update", {}).get("state") == "running":
                time.sleep(0.01)
            st = c.status("big")
            if st["update"]["state"] == "failed":
                caught = st
                break
            # The race was lost: the update was published before the kill (or the daemon saw
            # the connection close only afterwards). Try again on top of it.
            assert st["update"]["state"] == "done" and st["generation"] == generation + 1, st
            generation += 1
        if caught is None:
            pytest.skip("the update finished before the trainer could be killed, 5 times")
        assert caught["generation"] == generation, caught
        assert caught["update"]["generation"] == generation + 1
        assert "the connection that asked for it closed" in caught["update"]["error"], caught
        assert c.status("big")["state"] == "ready"
        if generation == 1:
            for r in range(T):
                assert w[r].refresh() is False
                assert_shows(w[r], before[r], f"rank {r} after the cancelled update")
        # The model takes the next update as if nothing had happened.
        reply = c.update("big", {"model.norm.weight": np.full((h,), 2.0, np.float32)})
        assert reply["generation"] == generation + 1 and reply["state"] == "ready"
        for r in range(T):
            assert w[r].refresh() is True
            assert (w[r]["model.norm.weight"] == 0x4000).all()  # 2.0 in bf16
        del w


def test_partial_update_status_counts_only_what_it_reads(daemon):
    ckpt = os.path.join(daemon["dir"], "f32-partial")
    tensors, _ = write_checkpoint(ckpt, dtype="F32", seed=4, **SMALL)
    with loaded(daemon, "partial", ckpt, dtype="bf16") as c:
        new = {"model.norm.weight": np.full(tensors["model.norm.weight"][1].shape, 2.0,
                                            np.float32)}
        reply = c.update("partial", new)
        assert reply["bytes_read"] == new["model.norm.weight"].nbytes
        u = c.status("partial")["update"]
        assert u["state"] == "done"
        assert u["bytes_total"] == reply["bytes_read"], u
        assert u["bytes_done"] == u["bytes_total"], u
