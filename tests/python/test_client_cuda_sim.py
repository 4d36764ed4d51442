"""The Python package against `weightd --backend cuda`: DLPack capsules of device tensors.

Runs on the simulated CUDA driver of tests/sim_cuda (ctest sets WEIGHTD_CUDA_DRIVER to it and
WDSIM_DEVICES=2x...), or on a real GPU when WEIGHTD_CUDA_DRIVER is unset and one is present.
The daemon loads an fp32 checkpoint at T=2 with a cast to bf16 onto two devices; for every
tensor of both ranks this test checks the DLPack capsule the C ABI exports (kDLCUDA, the
right device ordinal, pointer, shape, contiguous strides, bfloat16 dtype) and reads the bytes at
the capsule's pointer through the CUDA driver itself (cuMemcpyDtoH, not weightd's code): they
equal `weightctl shard --tp 2 --dtype bf16`, read with a few lines of safetensors parsing.

Environment (set by ctest): WEIGHTD_BIN, WEIGHTCTL, WEIGHTD_CLIENT_LIB, PYTHONPATH,
WEIGHTD_CUDA_DRIVER (optional).
"""
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

import weightd
from weightd import _lib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_client_python import read_safetensors, start_daemon  # noqa: E402

KDLCUDA = 2
KDLBFLOAT = 4


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("dtype_code", ctypes.c_uint8),
        ("dtype_bits", ctypes.c_uint8),
        ("dtype_lanes", ctypes.c_uint16),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.CFUNCTYPE(None, ctypes.c_void_p)),
    ]


class Driver:
    """The few driver entry points this test needs, resolved the way the driver documents."""

    def __init__(self):
        path = os.environ.get("WEIGHTD_CUDA_DRIVER") or "libcuda.so.1"
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            pytest.skip(f"no CUDA driver ({e})")
        gpa = lib.cuGetProcAddress_v2
        gpa.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                        ctypes.c_uint64, ctypes.c_void_p]
        gpa.restype = ctypes.c_int

        def get(name, *argtypes):
            p = ctypes.c_void_p()
            status = ctypes.c_int()
            assert gpa(name.encode(), ctypes.byref(p), 12000, 0, ctypes.byref(status)) == 0, name
            return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(p.value)

        self.init = get("cuInit", ctypes.c_uint)
        self.count = get("cuDeviceGetCount", ctypes.POINTER(ctypes.c_int))
        self.device_get = get("cuDeviceGet", ctypes.POINTER(ctypes.c_int), ctypes.c_int)
        self.retain = get("cuDevicePrimaryCtxRetain", ctypes.POINTER(ctypes.c_void_p), ctypes.c_int)
        self.release = get("cuDevicePrimaryCtxRelease", ctypes.c_int)
        self.set_current = get("cuCtxSetCurrent", ctypes.c_void_p)
        self.dtoh = get("cuMemcpyDtoH", ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t)
        if self.init(0) != 0:
            pytest.skip("cuInit failed: no usable CUDA device")
        n = ctypes.c_int()
        assert self.count(ctypes.byref(n)) == 0
        self.devices = n.value
        self.simulated = hasattr(lib, "wdsim_abi_version")

    def read(self, ordinal, ptr, n):
        dev = ctypes.c_int()
        assert self.device_get(ctypes.byref(dev), ordinal) == 0
        ctx = ctypes.c_void_p()
        assert self.retain(ctypes.byref(ctx), dev) == 0
        try:
            assert self.set_current(ctx) == 0
            buf = ctypes.create_string_buffer(n)
            rc = self.dtoh(buf, ptr, n)
            assert rc == 0, f"cuMemcpyDtoH of {n} bytes at {ptr:#x} on device {ordinal}: {rc}"
            return buf.raw
        finally:
            self.set_current(None)
            self.release(dev)


@pytest.fixture(scope="module")
def cuda_daemon():
    drv = Driver()
    d = tempfile.mkdtemp(prefix="weightd-py-cuda-")
    sock = os.path.join(d, "weightd.sock")
    ckpt = os.path.join(d, "f32")
    maker = os.environ.get("WEIGHTD_CHECKPOINT_PYTHON", sys.executable)
    subprocess.run([maker, os.path.join(HERE, "make_demo_checkpoint.py"), ckpt, "--f32"],
                   check=True, stdout=subprocess.DEVNULL)
    shard = os.path.join(d, "shard")
    subprocess.run([os.environ["WEIGHTCTL"], "shard", ckpt, "--tp", "2", "--dtype", "bf16",
                    "--out", shard], check=True, stdout=subprocess.DEVNULL)
    proc, log, c = start_daemon(d, {"socket": sock, "backend": "cuda", "io_threads": 2})
    devices = [0, 1] if drv.devices >= 2 else [0, 0]
    c.load("m", ckpt, tp=2, devices=devices, dtype="bf16", wait=True, timeout=120)
    c.close()
    try:
        yield {"dir": d, "socket": sock, "shard": shard, "devices": devices, "driver": drv}
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        log.close()
        if rc != 0:
            print(open(os.path.join(d, "weightd.log")).read())
        shutil.rmtree(d, ignore_errors=True)
        assert rc == 0, f"weightd exited with {rc}"


@pytest.mark.parametrize("rank", [0, 1])
def test_dlpack_capsules_of_device_tensors(cuda_daemon, rank):
    drv = cuda_daemon["driver"]
    want = read_safetensors(os.path.join(cuda_daemon["shard"],
                                         f"model-rank-{rank}-part-0.safetensors"))
    with weightd.Client(cuda_daemon["socket"]) as c:
        lib = _lib.lib()
        h = ctypes.c_void_p()
        _lib.check(lib.wd_attach(c._handle(), b"m", rank, ctypes.byref(h)))
        try:
            n = lib.wd_attachment_num_tensors(h)
            assert n == len(want)
            infos = (_lib.TensorInfo * n)()
            _lib.check(lib.wd_attachment_tensors(h, infos, n))
            for i, info in enumerate(infos):
                name = info.name.decode()
                dtype, shape, raw = want[name]
                assert dtype == "BF16", name
                managed = ctypes.c_void_p()
                _lib.check(lib.wd_attachment_export_dlpack(h, i, ctypes.byref(managed)))
                m = DLManagedTensor.from_address(managed.value)
                t = m.dl_tensor
                assert t.device_type == KDLCUDA, name
                assert t.device_id == cuda_daemon["devices"][rank] == info.device, name
                assert t.data == info.data and t.data, name
                assert (t.dtype_code, t.dtype_bits, t.dtype_lanes) == (KDLBFLOAT, 16, 1), name
                assert tuple(t.shape[k] for k in range(t.ndim)) == shape, name
                expect_strides = []
                step = 1
                for dim in reversed(shape):
                    expect_strides.insert(0, step)
                    step *= dim
                if t.ndim and t.strides:
                    assert [t.strides[k] for k in range(t.ndim)] == expect_strides, name
                got = drv.read(t.device_id, t.data + t.byte_offset, len(raw))
                assert got == raw, f"{name}: device bytes differ from weightctl shard"
                # Through the client's own read path too.
                buf = ctypes.create_string_buffer(len(raw))
                _lib.check(lib.wd_attachment_read(h, i, 0, buf, len(raw)))
                assert buf.raw == raw, name
                m.deleter(managed.value)
            _lib.check(lib.wd_attachment_verify(h))
        finally:
            lib.wd_attachment_release(h)


def test_numpy_refuses_device_tensors_with_a_clear_error(cuda_daemon):
    with pytest.raises(weightd.WeightdError, match="CUDA memory"):
        weightd.attach("m", socket=cuda_daemon["socket"], backend="numpy")
