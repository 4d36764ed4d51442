"""weightd.Client and weightd.attach: the Python face of the C ABI."""
import ctypes
import json
import os
import time

from . import _lib
from ._errors import WeightdError, error_from_code
from ._memfd import safetensors_memfd

# safetensors dtype -> numpy typestr. numpy has no bfloat16 / float8: those are exposed as raw
# uint16 / uint8 bit patterns of the same size (reinterpret them yourself, e.g. with ml_dtypes).
_NUMPY_TYPESTR = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "|i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "|u1",
    "BOOL": "|b1", "F8_E4M3": "|u1", "F8_E5M2": "|u1",
}
_TORCH_FP8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class _Lease:
    """One reference on a wd_attachment; the last reference released unmaps and detaches."""

    __slots__ = ("_lib", "ptr")

    def __init__(self, lib, ptr):
        self._lib = lib
        self.ptr = ptr

    def __del__(self):
        if self.ptr:
            self._lib.wd_attachment_release(self.ptr)
            self.ptr = None


class Attachment(dict):
    """What Client.attach() returns: a dict tensor name -> tensor (zero-copy), plus the
    attachment's model generation and refresh().

    Every tensor holds a reference on the attachment (the lease); this dict holds one too.
    """

    def __init__(self, tensors, lease):
        super().__init__(tensors)
        self._lease = lease

    @property
    def generation(self):
        """The model generation the tensors show (1 from a daemon without generations)."""
        _lib.require_abi(2, "Attachment.generation")
        return int(self._lease._lib.wd_attachment_generation(self._lease.ptr))

    def refresh(self):
        """Moves the attachment to the model's newest generation: False when it shows the newest
        already, True when the tensors now show the new generation's bytes.

        The new bytes are mapped at the same addresses, so every tensor of this dict (and every
        view of one, numpy or torch, host or CUDA) reads the new weights from now on; nothing has
        to be re-attached. Host memory is replaced atomically per arena; device memory is
        unmapped and mapped again, so no kernel may read the weights meanwhile: call it between
        steps, after synchronizing. FailedPreconditionError naming the first difference when
        the new generation's layout differs; on any error the old generation stays mapped.
        """
        _lib.require_abi(2, "Attachment.refresh")
        changed = ctypes.c_int(0)
        _lib.check(self._lease._lib.wd_attachment_refresh(self._lease.ptr, ctypes.byref(changed)))
        return bool(changed.value)


class _ArrayView:
    """Base object of one numpy array: exposes the read-only memory and holds the lease."""

    __slots__ = ("__array_interface__", "_lease")

    def __init__(self, interface, lease):
        self.__array_interface__ = interface
        self._lease = lease


def _default_backend():
    try:
        import torch  # noqa: F401
        return "torch"
    except ImportError:
        return "numpy"


class Client:
    """A connection to weightd.

    `socket`: the daemon's socket path; None = $WEIGHTD_SOCKET, $XDG_RUNTIME_DIR/weightd.sock,
    /run/weightd/weightd.sock. Raises UnavailableError when no daemon answers.

    Tensors returned by attach() keep their own reference to the connection and the lease: they
    stay valid after the Client is closed or garbage-collected. Methods are thread-safe
    (serialized on the one connection). Usable as a context manager.
    """

    def __init__(self, socket=None):
        self._lib = _lib.lib()
        h = ctypes.c_void_p()
        _lib.check(self._lib.wd_connect(socket.encode() if socket else None, ctypes.byref(h)))
        self._h = h

    def close(self):
        if self._h:
            self._lib.wd_client_free(self._h)
            self._h = None

    def __del__(self):
        if getattr(self, "_h", None):
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _handle(self):
        if not self._h:
            raise WeightdError(9, "the Client is closed")
        return self._h

    @property
    def version(self):
        """The protocol version agreed with the daemon."""
        return self._lib.wd_client_version(self._handle())

    def list(self):
        """All models visible to this user: a list of dicts (name, state, checkpoint, backend,
        tp, bytes_total, bytes_done, seconds, error?, ranks=[{rank, device, state, arena_bytes,
        tensors, lease_count, leases=[{lease, pid, uid}]}]); `leases` lists at most 64 leases in
        all, `lease_count` counts each rank's."""
        out = ctypes.c_void_p()
        _lib.check(self._lib.wd_list_json(self._handle(), ctypes.byref(out)))
        return json.loads(_lib.take_string(out))["models"]

    def status(self, name=None):
        """The status dict of model `name` (NotFoundError if absent), or list() when None."""
        out = ctypes.c_void_p()
        _lib.check(self._lib.wd_status_json(self._handle(), name.encode() if name else None,
                                            ctypes.byref(out)))
        models = json.loads(_lib.take_string(out))["models"]
        return models[0] if name else models

    def load(self, name, checkpoint, *, tp=1, ranks=None, devices=None, dtype=None, skip=None,
             recipe=None, recipe_file=None, expert_parallel=False, allow_uids=None,
             allow_gids=None, wait=False, timeout=None):
        """Starts loading `checkpoint` (a directory the daemon can read) as `name`.

        Returns once the daemon accepted the load, or with wait=True once it is ready (the final
        status dict; WeightdError with the load's error if it failed, DeadlineExceeded after
        `timeout` seconds)."""
        opts = {"tp": tp}
        for key, value in (("ranks", ranks), ("devices", devices), ("dtype", dtype),
                           ("skip", skip), ("recipe", recipe), ("recipe_file", recipe_file),
                           ("allow_uids", allow_uids), ("allow_gids", allow_gids)):
            if value is not None:
                opts[key] = list(value) if isinstance(value, (list, tuple)) else value
        if expert_parallel:
            opts["expert_parallel"] = True
        _lib.check(self._lib.wd_load(self._handle(), name.encode(), str(checkpoint).encode(),
                                     json.dumps(opts).encode()))
        if not wait:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status(name)
            if st["state"] == "ready":
                return st
            if st["state"] == "failed":
                raise WeightdError(13, f"load of '{name}' failed: {st.get('error', '')}")
            if deadline is not None and time.monotonic() > deadline:
                raise error_from_code(4, f"load of '{name}' not ready after {timeout} s "
                                         f"({st['bytes_done']} of {st['bytes_total']} bytes)")
            time.sleep(0.02)

    def unload(self, name, force=False):
        """Unloads `name`. FailedPreconditionError while attached unless force=True."""
        _lib.check(self._lib.wd_unload(self._handle(), name.encode(), 1 if force else 0))

    def metrics(self):
        """The daemon's metrics, Prometheus text format."""
        out = ctypes.c_void_p()
        _lib.check(self._lib.wd_metrics(self._handle(), ctypes.byref(out)))
        return _lib.take_string(out)

    def attach(self, name, rank=0, backend=None):
        """Attaches to rank `rank` of model `name`: a dict tensor name -> tensor, zero-copy
        (an Attachment: a dict with .generation and .refresh()).

        backend: "torch" (torch.Tensor via DLPack; the default when torch is importable) or
        "numpy" (numpy.ndarray). The memory is read-only: numpy arrays are flagged read-only
        (writing raises ValueError); torch has no read-only tensors, so an in-place write to one
        crashes the process with SIGSEGV -- clone() what you want to modify.

        dtypes: with numpy, BF16 is exposed as uint16 and F8_E4M3/F8_E5M2 as uint8 (their raw
        bit patterns; numpy has no such types). With torch, BF16 is torch.bfloat16 and FP8 is
        torch.float8_e4m3fn/float8_e5m2 where this torch has them, else uint8.

        Lifetime: every tensor holds a reference on the attachment; the lease is held (and the
        model cannot be unloaded without force) until the last tensor is garbage-collected,
        whatever happens to this Client. Device arenas give CUDA tensors on their device.
        """
        backend = backend or _default_backend()
        if backend not in ("torch", "numpy"):
            raise WeightdError(3, f"backend must be 'torch' or 'numpy', got {backend!r}")
        lib = self._lib
        h = ctypes.c_void_p()
        _lib.check(lib.wd_attach(self._handle(), name.encode(), int(rank), ctypes.byref(h)))
        lease = _Lease(lib, h.value)  # takes wd_attach's reference
        n = lib.wd_attachment_num_tensors(lease.ptr)
        infos = (_lib.TensorInfo * n)()
        _lib.check(lib.wd_attachment_tensors(lease.ptr, infos, n))
        if backend == "torch":
            return Attachment(_to_torch(lib, lease, infos), lease)
        return Attachment(_to_numpy(lease, infos), lease)

    # ---- generations (docs/PROTOCOL.md "Generations") ----

    def update(self, name, tensors_or_checkpoint, wait=True):
        """Publishes new weights for model `name` as its next generation; returns the daemon's
        reply as a dict: name, generation, state ("ready" once published, "updating" with
        wait=False), seconds, bytes_read, ranks_rewritten, targets_rewritten, targets_copied,
        segments_rewritten, bytes_allocated, bytes_copied (the arenas the update replaced, the
        bytes it allocated for them and copied into them from the previous generation; all 0
        with wait=False).

        tensors_or_checkpoint: a str or os.PathLike is a checkpoint (directory or .safetensors
        file the daemon can read, under its model_roots). A dict maps checkpoint (Hugging Face)
        tensor names to torch tensors (any device; bfloat16 and float8 included) or numpy
        arrays, with the checkpoint's dtypes and shapes; any subset of the checkpoint's tensors.
        They are copied once into a sealed memfd laid out as a safetensors file, which the daemon
        reads (no file on disk; the memfd's memory is held until this returns).

        wait: return once the generation is published (or raise the update's error), else once
        the daemon accepted it (watch status(name)["update"] or wait_generation()).
        InvalidArgumentError names an unknown tensor (and the nearest names) or one whose dtype
        or shape differs; FailedPreconditionError the model's state (loading, updating, ...).
        """
        _lib.require_abi(2, "Client.update")
        out = ctypes.c_void_p()
        if isinstance(tensors_or_checkpoint, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(tensors_or_checkpoint))
            _lib.check(self._lib.wd_update(self._handle(), name.encode(), path.encode(),
                                           1 if wait else 0, ctypes.byref(out)))
        elif isinstance(tensors_or_checkpoint, dict):
            fd = safetensors_memfd(tensors_or_checkpoint)
            try:
                _lib.check(self._lib.wd_update_fd(self._handle(), name.encode(), fd,
                                                  1 if wait else 0, ctypes.byref(out)))
            finally:
                os.close(fd)
        else:
            raise error_from_code(3, "update: expected a checkpoint path or a dict name -> "
                                     f"tensor, got {type(tensors_or_checkpoint).__name__}")
        return json.loads(_lib.take_string(out))

    def wait_generation(self, name, after, timeout=None):
        """Waits until model `name`'s generation is above `after`; returns (generation,
        timed_out). timeout: seconds, None = as long as it takes. The daemon answers one wait
        after at most 10 minutes, so longer waits are several requests. This connection answers
        nothing else meanwhile: wait on a Client of its own. NotFoundError when the model is
        unloaded."""
        _lib.require_abi(2, "Client.wait_generation")
        max_ms = 600_000
        deadline = None if timeout is None else time.monotonic() + timeout
        gen = ctypes.c_uint64()
        timed_out = ctypes.c_int()
        while True:
            if deadline is None:
                ms = max_ms
            else:
                ms = min(max_ms, max(0, int((deadline - time.monotonic()) * 1000 + 0.999)))
            _lib.check(self._lib.wd_wait_generation(self._handle(), name.encode(), int(after), ms,
                                                    ctypes.byref(gen), ctypes.byref(timed_out)))
            if not timed_out.value:
                return int(gen.value), False
            if deadline is not None and time.monotonic() >= deadline:
                return int(gen.value), True

    def rollback(self, name):
        """Re-publishes the kept previous generation's weights as a new generation and returns
        its number. FailedPreconditionError when no previous generation is kept (daemon config
        keep_previous_generation) or an update is running."""
        _lib.require_abi(2, "Client.rollback")
        gen = ctypes.c_uint64()
        _lib.check(self._lib.wd_rollback(self._handle(), name.encode(), ctypes.byref(gen)))
        return int(gen.value)


def _to_numpy(lease, infos):
    import numpy as np

    out = {}
    for t in infos:
        name = t.name.decode()
        dtype = t.dtype.decode()
        typestr = _NUMPY_TYPESTR[dtype]
        nd = t.ndim
        shape = tuple(t.shape[i] for i in range(nd))
        if t.device >= 0:
            raise WeightdError(12, f"tensor '{name}' is in CUDA memory (device {t.device}); "
                                   "attach with backend='torch' for device arenas")
        if t.nbytes == 0 or not t.data:
            a = np.empty(shape, dtype=typestr)
            a.flags.writeable = False
            out[name] = a
            continue
        strides = tuple(t.strides[i] * t.itemsize for i in range(nd))
        iface = {"version": 3, "shape": shape, "typestr": typestr, "data": (t.data, True),
                 "strides": strides}
        out[name] = np.asarray(_ArrayView(iface, lease))
    return out


def _to_torch(lib, lease, infos):
    import torch
    from torch.utils.dlpack import from_dlpack

    out = {}
    managed = ctypes.c_void_p()
    for i, t in enumerate(infos):
        _lib.check(lib.wd_attachment_export_dlpack(lease.ptr, i, ctypes.byref(managed)))
        tensor = from_dlpack(_lib.dlpack_capsule(managed.value))
        fp8 = _TORCH_FP8.get(t.dtype.decode())
        if fp8 is not None and hasattr(torch, fp8):
            tensor = tensor.view(getattr(torch, fp8))
        out[t.name.decode()] = tensor
    return out


def attach(name, rank=0, socket=None, backend=None):
    """Attaches to rank `rank` of model `name` and returns a dict name -> tensor (zero-copy).

    Same as Client(socket).attach(name, rank, backend): torch tensors when torch is importable,
    read-only numpy arrays otherwise (or with backend="numpy"; BF16 then appears as uint16 and
    FP8 as uint8 bit patterns). The tensors keep the lease until the last one is deleted.
    """
    with Client(socket) as c:
        return c.attach(name, rank, backend=backend)
