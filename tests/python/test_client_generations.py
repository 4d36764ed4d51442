"""Generations in the Python package, without the real daemon.

1. The sealed safetensors memfds that Client.update() builds from numpy arrays and torch tensors
   (weightd/_memfd.py), and the one the C++ client writes (client/src/detail/
   safetensors_memfd.cc, dumped by wd_safetensors_memfd_dump), are read back with the PyPI
   `safetensors` package, an implementation independent of weightd.
2. Client.update / wait_generation / rollback and Attachment.generation / refresh go through
   libweightd_client.so to a fake daemon written here (SOCK_SEQPACKET, SCM_RIGHTS, the manifest
   format of docs/PROTOCOL.md), which checks the update memfd and serves a refresh: the arrays
   and tensors made by attach() show the new generation's bytes in place.
3. weightctl update / rollback / wait-generation / status against the same fake daemon.

End-to-end tests against the real daemon's update support are left to the daemon's own tests.

Environment (set by ctest): WEIGHTD_CLIENT_LIB, PYTHONPATH=client/python, WEIGHTCTL,
WD_SAFETENSORS_MEMFD_DUMP (the C++ writer's dump tool), WEIGHTD_CHECKPOINT_PYTHON (an
interpreter with `safetensors`, when this one lacks it), WEIGHTD_REQUIRE_TORCH=1 (the torch
run: torch tests must not skip).
"""
import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

import weightd
from weightd._memfd import safetensors_memfd

ALL_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

# Run by an interpreter that has `safetensors`: prints {name: {dtype, shape, hex}} of the file
# argv[1] as the package reads it (deserialize for the raw bytes of every dtype, safe_open with
# numpy for the values of those numpy has).
_READER = r"""
import json, sys
import safetensors
from safetensors import safe_open
path = sys.argv[1]
with open(path, "rb") as f:
    data = f.read()
out = {}
for name, t in safetensors.deserialize(data):
    out[name] = {"dtype": t["dtype"], "shape": list(t["shape"]), "hex": bytes(t["data"]).hex()}
with safe_open(path, framework="numpy") as f:
    assert sorted(f.keys()) == sorted(out), (sorted(f.keys()), sorted(out))
    for k in f.keys():
        s = f.get_slice(k)
        assert s.get_dtype() == out[k]["dtype"], k
        assert list(s.get_shape()) == out[k]["shape"], k
        if out[k]["dtype"] not in ("BF16", "F8_E4M3", "F8_E5M2"):
            assert f.get_tensor(k).tobytes().hex() == out[k]["hex"], k
print(json.dumps(out))
"""


def _safetensors_python():
    try:
        import safetensors  # noqa: F401
        return sys.executable
    except ImportError:
        other = os.environ.get("WEIGHTD_CHECKPOINT_PYTHON")
        if not other:
            pytest.skip("no interpreter with the `safetensors` package (WEIGHTD_CHECKPOINT_PYTHON)")
        return other


def read_with_safetensors(fd=None, path=None):
    """The file (an fd, read as /proc/self/fd/N in the reader, or a path) as `safetensors`
    reads it."""
    pass_fds = ()
    if fd is not None:
        path = f"/proc/self/fd/{fd}"
        pass_fds = (fd,)
    r = subprocess.run([_safetensors_python(), "-c", _READER, path], pass_fds=pass_fds,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def torch_or_skip():
    if os.environ.get("WEIGHTD_REQUIRE_TORCH") == "1":
        import torch
        return torch
    return pytest.importorskip("torch")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# ---- 1. The memfd builders against the safetensors package ----------------------------------

def test_numpy_memfd_reads_back_with_safetensors():
    f32 = np.arange(6, dtype=np.float32).reshape(2, 3) * 0.5
    tensors = {
        "model.layers.0.mlp.up_proj.weight": f32,
        "transposed": f32.T,                                   # not contiguous
        "ids": np.array([-1, 1 << 40, 7], dtype=np.int64),
        "big_endian": np.array([1.5, -2.0], dtype=">f4"),      # stored little-endian
        "flags": np.array([True, False, True]),
        "scalar": np.float32(42),
        "empty": np.zeros((0, 5), dtype=np.uint8),
        "unicode.\u00e9": np.ones(3, dtype=np.float16),
    }
    fd = safetensors_memfd(tensors)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == ALL_SEALS
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)
        got = read_with_safetensors(fd=fd)
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    finally:
        os.close(fd)
    # Space-padded to 8 bytes; the tensors back to back in the dict's order.
    assert n % 8 == 0
    assert list(header) == list(tensors)
    end = 0
    for meta in header.values():
        assert meta["data_offsets"][0] == end
        end = meta["data_offsets"][1]
    assert sorted(got) == sorted(tensors)
    dtypes = {"model.layers.0.mlp.up_proj.weight": "F32", "transposed": "F32", "ids": "I64",
              "big_endian": "F32", "flags": "BOOL", "scalar": "F32", "empty": "U8",
              "unicode.\u00e9": "F16"}
    for name, value in tensors.items():
        value = np.asarray(value)
        assert got[name]["dtype"] == dtypes[name], name
        assert got[name]["shape"] == list(value.shape), name
        little = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"))
        assert got[name]["hex"] == little.tobytes().hex(), name


def test_contiguous_host_tensors_are_written_without_a_mapping(monkeypatch):
    """C-contiguous little-endian host arrays go into the memfd with pwrite: no mapping is made
    (none to unmap before the seal); a transposed one among them still gets one."""
    import weightd._memfd as memfd_module

    made = []
    real_mmap = memfd_module.mmap.mmap

    def counting_mmap(*args, **kwargs):
        made.append(args)
        return real_mmap(*args, **kwargs)

    monkeypatch.setattr(memfd_module.mmap, "mmap", counting_mmap)
    big = np.arange(3 << 20, dtype=np.uint16).reshape(3, 1 << 20)  # 6 MiB, pages written whole
    fd = safetensors_memfd({"a": big, "b": np.float32(2.5)})
    try:
        got = read_with_safetensors(fd=fd)
    finally:
        os.close(fd)
    assert made == []
    assert got["a"]["hex"] == big.tobytes().hex()
    assert got["b"]["hex"] == np.float32(2.5).tobytes().hex()
    fd = safetensors_memfd({"a": big, "t": big[:, :8].T})
    try:
        got = read_with_safetensors(fd=fd)
    finally:
        os.close(fd)
    assert len(made) == 1
    assert got["t"]["hex"] == np.ascontiguousarray(big[:, :8].T).tobytes().hex()


def test_torch_memfd_reads_back_with_safetensors():
    torch = torch_or_skip()
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 3
    tensors = {
        "model.norm.weight": torch.tensor([1.0, 2.0, -3.0, 0.0], dtype=torch.bfloat16),
        "bf16_2d": base.to(torch.bfloat16),
        "transposed": base.T,                                     # not contiguous
        "ids": torch.tensor([-1, 1 << 40, 7], dtype=torch.int64),
        "needs_grad": torch.ones(2, requires_grad=True),
        "scalar": torch.tensor(42.0),
        "empty": torch.zeros(0, 2, dtype=torch.float16),
    }
    expected_dtype = {"model.norm.weight": "BF16", "bf16_2d": "BF16", "transposed": "F32",
                      "ids": "I64", "needs_grad": "F32", "scalar": "F32", "empty": "F16"}
    if hasattr(torch, "float8_e4m3fn"):
        tensors["fp8"] = torch.tensor([0.5, -1.0, 2.0]).to(torch.float8_e4m3fn)
        expected_dtype["fp8"] = "F8_E4M3"
    fd = safetensors_memfd(tensors)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == ALL_SEALS
        got = read_with_safetensors(fd=fd)
    finally:
        os.close(fd)
    assert sorted(got) == sorted(tensors)
    for name, t in tensors.items():
        assert got[name]["dtype"] == expected_dtype[name], name
        assert got[name]["shape"] == list(t.shape), name
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert got[name]["hex"] == raw.hex(), name


def test_torch_cuda_tensor_is_copied_from_the_device():
    torch = torch_or_skip()
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    t = torch.arange(8, dtype=torch.bfloat16, device="cuda")
    fd = safetensors_memfd({"w": t})
    try:
        got = read_with_safetensors(fd=fd)
    finally:
        os.close(fd)
    assert got["w"]["hex"] == t.cpu().view(torch.uint8).numpy().tobytes().hex()


def test_cpp_writer_reads_back_with_safetensors(tmp_path):
    tool = os.environ.get("WD_SAFETENSORS_MEMFD_DUMP")
    if not tool:
        pytest.skip("WD_SAFETENSORS_MEMFD_DUMP (the C++ writer's dump tool) is not set")
    out = tmp_path / "cpp.safetensors"
    subprocess.run([tool, str(out)], check=True)
    got = read_with_safetensors(path=str(out))
    expected = {
        "f32": ("F32", [2, 3], (np.arange(6, dtype="<f4") * 0.5).tobytes()),
        "bf16": ("BF16", [4], np.array([0x3f80, 0x4000, 0xc040, 0], dtype="<u2").tobytes()),
        "i64": ("I64", [3], np.array([-1, 1 << 40, 7], dtype="<i8").tobytes()),
        "flags": ("BOOL", [2], b"\x01\x00"),
        "scalar": ("F32", [], np.array(42, dtype="<f4").tobytes()),
        "empty": ("U8", [0, 5], b""),
    }
    assert sorted(got) == sorted(expected)
    for name, (dtype, shape, raw) in expected.items():
        assert got[name] == {"dtype": dtype, "shape": shape, "hex": raw.hex()}, name


def test_bad_inputs_name_the_tensor_and_leak_no_fd():
    before = open_fds()
    cases = [
        ({"": np.zeros(1)}, "tensor name ''"),
        ({"__metadata__": np.zeros(1)}, "'__metadata__'"),
        ({5: np.zeros(1)}, "tensor name 5"),
        ({"a": [1, 2]}, "tensor 'a' is a list"),
        ({"a": np.zeros(2, dtype=np.complex64)}, "tensor 'a' has dtype complex64"),
        ([np.zeros(1)], "must be a dict"),
    ]
    for tensors, expect in cases:
        with pytest.raises(weightd.InvalidArgumentError) as e:
            safetensors_memfd(tensors)
        assert expect in e.value.message, (expect, e.value.message)
    assert open_fds() == before


# ---- 2. The client against a fake daemon ------------------------------------------------------

MANIFEST_HEADER = struct.Struct("<8sIIQIIIiQQQQII")
ARENA = struct.Struct("<QII")
TENSOR = struct.Struct("<IIBBHIQQII7q7qQ")
DTYPE_CODES = {"F32": 1}


def encode_manifest(model, tensors, arena_size):
    """The manifest (docs/PROTOCOL.md "Manifest binary format") of one host arena holding
    `tensors`: [(name, dtype, shape, offset, nbytes)], C-contiguous, CRC32C left 0."""
    strings = model.encode()
    entries = b""
    for name, dtype, shape, offset, nbytes in tensors:
        strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        pad = [0] * (7 - len(shape))
        entries += TENSOR.pack(len(strings), len(name.encode()), DTYPE_CODES[dtype], len(shape), 0,
                               0, offset, nbytes, 0, 0, *(list(shape) + pad),
                               *(strides + pad), 0)
        strings += name.encode()
    arenas = ARENA.pack(arena_size, 0, 0)
    arenas_off = MANIFEST_HEADER.size
    tensors_off = arenas_off + len(arenas)
    strings_off = tensors_off + len(entries)
    total = strings_off + len(strings)
    header = MANIFEST_HEADER.pack(b"WDMANIF\0", 1, 80, total, 1, len(tensors), 0, -1, arenas_off,
                                  tensors_off, strings_off, len(strings), 0, len(model.encode()))
    return header + arenas + entries + strings


def sealed_memfd(data, size=None):
    fd = os.memfd_create("fake", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, len(data) if size is None else size)
    os.pwrite(fd, data, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ALL_SEALS)
    return fd


class FakeDaemon:
    """weightd for one connection at a time: hello, attach/refresh of model "m" rank 0 (an F32
    [4] tensor "w" holding `values[generation]`), detach, status, update (keeps the fd it got;
    `update_statuses` are what the following status requests show of it), wait_generation
    (answers `wait_replies` in turn, the last one from then on), rollback. Every request lands
    in `requests`."""

    ARENA = 4096

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="weightd-pyfake-")
        self.path = os.path.join(self.dir, "s")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.generation = 1
        self.values = {1: [1, 2, 3, 4], 2: [5, 6, 7, 8]}
        self.requests = []
        self.update_fds = []
        self.wait_replies = [{"generation": 2, "timed_out": False}]
        self.update_statuses = []
        self.previous_generation = 0
        self.errors = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self):
        # shutdown() wakes the accept() the serving thread blocks in; close() alone would not.
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the fake daemon's thread did not end"
        for fd in self.update_fds:
            os.close(fd)
        shutil.rmtree(self.dir, ignore_errors=True)
        assert not self.errors, self.errors

    def _attach_reply(self, req, extra):
        arena = np.array(self.values[self.generation], dtype="<f4").tobytes()
        man = encode_manifest("m", [("w", "F32", [4], 0, 16)], self.ARENA)
        result = {"name": "m", "rank": 0, "lease": 1, "generation": self.generation,
                  "manifest_bytes": len(man), "arenas": 1, "fd_messages": 0, **extra}
        return result, [sealed_memfd(man), sealed_memfd(arena, self.ARENA)]

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._serve_one(conn)

    def _serve_one(self, conn):
        with conn:
            while True:
                msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 8)
                if not msg:
                    return
                req = json.loads(msg)
                self.requests.append(req)
                try:
                    result, send = self._answer(req, fds)
                except Exception as e:  # noqa: BLE001: reported by close()
                    self.errors.append(repr(e))
                    result, send = {}, []
                reply = json.dumps({"ok": True, "id": req.get("id"), "result": result}).encode()
                try:
                    if send:
                        socket.send_fds(conn, [reply], send)
                    else:
                        conn.send(reply)
                finally:
                    for fd in send:
                        os.close(fd)

    def _answer(self, req, fds):
        op = req["op"]
        if op != "update":
            assert not fds, f"{op} carried fds"
        if op == "hello":
            return {"version": 1, "server": "fake"}, []
        if op == "attach":
            return self._attach_reply(req, {})
        if op == "refresh":
            assert req["lease"] == 1 and req["rank"] == 0, req
            if self.generation == 1:
                self.generation = 2
                return self._attach_reply(req, {"unchanged": False})
            return {"name": "m", "rank": 0, "lease": 1, "generation": 2, "unchanged": True}, []
        if op == "status":
            return {"models": [self._status()]}, []
        if op == "update":
            self.update_fds.extend(fds)
            return {"name": req["name"], "generation": 3,
                    "state": "ready" if req.get("wait") else "updating",
                    **({"seconds": 0.5, "bytes_read": 16, "ranks_rewritten": 1,
                        "targets_rewritten": 1, "targets_copied": 0} if req.get("wait") else {})}, []
        if op == "wait_generation":
            reply = self.wait_replies.pop(0) if len(self.wait_replies) > 1 else self.wait_replies[0]
            return {"name": req["name"], **reply}, []
        if op == "rollback":
            return {"name": req["name"], "generation": 4, "restored": 2}, []
        return {}, []

    def _status(self):
        m = {"name": "m", "state": "ready", "checkpoint": "/ckpt", "backend": "host", "tp": 1,
             "bytes_total": 4096, "bytes_done": 4096, "seconds": 0.5,
             "generation": self.generation, "previous_generation": self.previous_generation,
             "ranks": [{"rank": 0, "device": -1, "state": "ready", "arena_bytes": 4096,
                        "tensors": 1, "lease_count": 1,
                        "leases": [{"lease": 1, "pid": 99, "uid": 0,
                                    "generation": self.generation}]}]}
        if self.update_statuses:
            update = self.update_statuses.pop(0) if len(self.update_statuses) > 1 \
                else self.update_statuses[0]
            m["update"] = update
            if update["state"] == "done":
                self.generation = update["generation"]
                m["generation"] = self.generation
        return m


@pytest.fixture
def fake():
    f = FakeDaemon()
    yield f
    f.close()


def test_refresh_numpy_arrays_show_the_new_generation_in_place(fake):
    c = weightd.Client(fake.path)
    w = c.attach("m", backend="numpy")
    assert isinstance(w, weightd.Attachment) and isinstance(w, dict)
    assert w.generation == 1
    a = w["w"]
    address = a.__array_interface__["data"][0]
    assert a.tolist() == [1, 2, 3, 4]
    assert w.refresh() is True
    assert w.generation == 2
    assert a.__array_interface__["data"][0] == address
    assert a.tolist() == [5, 6, 7, 8]            # the same array object, the new bytes
    assert w["w"] is a
    assert w.refresh() is False                  # unchanged
    assert a.tolist() == [5, 6, 7, 8]
    assert [r["op"] for r in fake.requests].count("refresh") == 2
    del a, w
    c.close()


def test_refresh_torch_tensors_show_the_new_generation_in_place(fake):
    torch = torch_or_skip()
    c = weightd.Client(fake.path)
    w = c.attach("m", backend="torch")
    t = w["w"]
    ptr = t.data_ptr()
    assert t.tolist() == [1, 2, 3, 4]
    assert w.refresh() is True
    assert t.data_ptr() == ptr
    assert t.tolist() == [5, 6, 7, 8]
    assert torch.equal(w["w"], torch.tensor([5.0, 6, 7, 8]))
    del t, w
    c.close()


def test_update_with_a_dict_sends_one_sealed_safetensors_memfd(fake):
    c = weightd.Client(fake.path)
    before = open_fds()
    new = np.array([9, 10, 11, 12], dtype=np.float32)
    reply = c.update("m", {"w": new})
    assert open_fds() == before + 1               # only the fake's own reference remains
    assert reply == {"name": "m", "generation": 3, "state": "ready", "seconds": 0.5,
                     "bytes_read": 16, "ranks_rewritten": 1, "targets_rewritten": 1,
                     "targets_copied": 0, "segments_rewritten": 0, "bytes_allocated": 0,
                     "bytes_copied": 0}
    req = [r for r in fake.requests if r["op"] == "update"][0]
    assert req["wait"] is True and "checkpoint" not in req
    assert len(fake.update_fds) == 1
    fd = fake.update_fds[0]
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == ALL_SEALS
    got = read_with_safetensors(fd=fd)
    assert got == {"w": {"dtype": "F32", "shape": [4], "hex": new.tobytes().hex()}}
    c.close()


def test_update_from_a_checkpoint_path(fake, tmp_path, monkeypatch):
    c = weightd.Client(fake.path)
    monkeypatch.chdir(tmp_path)
    reply = c.update("m", "new-ckpt", wait=False)
    assert reply["state"] == "updating" and reply["generation"] == 3 and reply["bytes_read"] == 0
    req = [r for r in fake.requests if r["op"] == "update"][0]
    # The daemon resolves paths in its own working directory: the client sends absolute ones.
    assert req["checkpoint"] == str(tmp_path / "new-ckpt")
    assert "wait" not in req
    assert fake.update_fds == []
    with pytest.raises(weightd.InvalidArgumentError):
        c.update("m", 5)
    c.close()


def test_wait_generation_and_rollback(fake):
    c = weightd.Client(fake.path)
    assert c.wait_generation("m", 1, timeout=5) == (2, False)
    req = [r for r in fake.requests if r["op"] == "wait_generation"][-1]
    assert req["after"] == 1 and 4000 <= req["timeout_ms"] <= 5000
    fake.wait_replies = [{"generation": 1, "timed_out": True}]
    assert c.wait_generation("m", 1, timeout=0) == (1, True)
    assert [r for r in fake.requests if r["op"] == "wait_generation"][-1]["timeout_ms"] == 0
    assert c.rollback("m") == 4
    c.close()


# ---- 3. weightctl against the fake daemon ----------------------------------------------------

def weightctl(fake, *args):
    tool = os.environ.get("WEIGHTCTL")
    if not tool:
        pytest.skip("WEIGHTCTL is not set")
    return subprocess.run([tool, *args, "--socket", fake.path], capture_output=True, text=True,
                          timeout=60)


def test_weightctl_update_wait_follows_status_to_the_new_generation(fake, tmp_path):
    fake.update_statuses = [
        {"state": "running", "generation": 3, "bytes_total": 100, "bytes_done": 40,
         "seconds": 0.2},
        {"state": "done", "generation": 3, "bytes_total": 100, "bytes_done": 100,
         "seconds": 0.5},
    ]
    r = weightctl(fake, "update", "m", "rel/ckpt", "--wait")
    assert r.returncode == 0, r.stderr
    # Not a terminal: no progress bar, one final line.
    assert r.stdout == "m: generation 3 published in 0.500 s (100 B read, 0.00 GB/s)\n"
    update = [q for q in fake.requests if q["op"] == "update"]
    assert len(update) == 1 and "wait" not in update[0]
    assert os.path.isabs(update[0]["checkpoint"]) and update[0]["checkpoint"].endswith("rel/ckpt")
    assert [q["op"] for q in fake.requests].count("status") == 2


def test_weightctl_update_wait_fails_with_the_updates_error(fake):
    fake.update_statuses = [
        {"state": "failed", "generation": 3, "bytes_total": 100, "bytes_done": 10,
         "seconds": 0.1, "error": "model.x.weight: file changed while read"},
    ]
    r = weightctl(fake, "update", "m", "/ckpt")
    assert r.returncode == 0 and "updating m to generation 3" in r.stdout, r.stderr
    r = weightctl(fake, "update", "m", "/ckpt", "--wait")
    assert r.returncode == 1
    assert "update of m to generation 3 failed: model.x.weight: file changed while read" in r.stderr


def test_weightctl_status_shows_generations_and_the_update(fake):
    fake.previous_generation = 1
    fake.generation = 2
    fake.update_statuses = [{"state": "running", "generation": 3, "bytes_total": 200,
                             "bytes_done": 50, "seconds": 1.0}]
    r = weightctl(fake, "status", "m")
    assert r.returncode == 0, r.stderr
    assert "generation 2 (previous 1)" in r.stdout
    assert "update to generation 3: [" in r.stdout and " 25.0% " in r.stdout
    r = weightctl(fake, "status", "m", "--json")
    m = json.loads(r.stdout)["models"][0]
    assert (m["generation"], m["previous_generation"]) == (2, 1)
    assert m["update"]["state"] == "running" and m["update"]["bytes_done"] == 50
    assert m["ranks"][0]["leases"][0]["generation"] == 2


def test_weightctl_rollback_and_wait_generation(fake):
    r = weightctl(fake, "rollback", "m")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "m: generation 4 serves the weights of generation 2\n"

    fake.wait_replies = [{"generation": 2, "timed_out": False}]
    r = weightctl(fake, "wait-generation", "m", "--after", "1")
    assert (r.returncode, r.stdout) == (0, "2\n"), r.stderr
    waits = [q for q in fake.requests if q["op"] == "wait_generation"]
    assert waits[-1]["after"] == 1 and waits[-1]["timeout_ms"] == 600000

    # Without --timeout a timed-out wait is asked again until the generation moves.
    fake.wait_replies = [{"generation": 1, "timed_out": True}, {"generation": 1, "timed_out": True},
                         {"generation": 5, "timed_out": False}]
    r = weightctl(fake, "wait-generation", "m", "--after", "1")
    assert (r.returncode, r.stdout) == (0, "5\n"), r.stderr

    fake.wait_replies = [{"generation": 1, "timed_out": True}]
    r = weightctl(fake, "wait-generation", "m", "--after", "1", "--timeout", "0.2")
    assert (r.returncode, r.stdout) == (1, "1\n")
    assert "still at generation 1 after 0.2 s" in r.stderr
    assert 0 < [q for q in fake.requests if q["op"] == "wait_generation"][-1]["timeout_ms"] <= 200
