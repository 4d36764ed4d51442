"""A safetensors file in a sealed memfd, built from numpy arrays or torch tensors: what
Client.update() hands the daemon for a dict of new tensors (docs/PROTOCOL.md "Generations").

    fd = safetensors_memfd({"model.norm.weight": torch_tensor, "lm_head.weight": np_array})
    try: ... wd_update_fd(client, name, fd, ...) ...
    finally: os.close(fd)

Layout (the safetensors format): 8-byte little-endian header length N, N bytes of JSON
{"<name>": {"dtype", "shape", "data_offsets": [begin, end]}} padded with spaces to a multiple of
8, then the tensors back to back in the dict's order. The memfd is sized first, and each tensor
is copied once, straight into its place: tensors in host memory that are C-contiguous and
little-endian with os.pwrite from their own buffer (whole pages written so are not zeroed
first, and nothing needs unmapping), the others through a mapping made for them: np.copyto for
numpy arrays, Tensor.copy_ for torch tensors (a CUDA tensor is copied device-to-host by torch
directly into the memfd's pages; non-contiguous inputs are gathered by the same copy). Any
mapping is closed and the memfd sealed with F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL
before it is returned, so the daemon reads exactly these bytes.
"""
import fcntl
import json
import mmap
import os

from ._errors import error_from_code

_INVALID_ARGUMENT = 3

# numpy dtype name -> safetensors dtype. bfloat16 / float8 are ml_dtypes' numpy types.
_NUMPY = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
# torch dtype attribute name -> safetensors dtype (float8 types exist in torch >= 2.1).
_TORCH = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _invalid(message):
    return error_from_code(_INVALID_ARGUMENT, message)


def _describe(name, value):
    """(safetensors dtype, shape, nbytes, kind) of one input; kind is "numpy" or "torch"."""
    mod = type(value).__module__.split(".")[0]
    if mod == "torch":
        import torch

        dtype = next((st for attr, st in _TORCH.items()
                      if getattr(torch, attr, None) == value.dtype), None)
        if dtype is None:
            raise _invalid(f"tensor '{name}' has dtype {value.dtype}, which safetensors lacks")
        shape = tuple(int(d) for d in value.shape)
        return dtype, shape, value.numel() * value.element_size(), "torch"
    if mod == "numpy" or hasattr(value, "__array_interface__"):
        import numpy as np

        value = np.asarray(value)
        dtype = _NUMPY.get(value.dtype.name)
        if dtype is None:
            raise _invalid(f"tensor '{name}' has dtype {value.dtype}, which safetensors lacks")
        return dtype, tuple(int(d) for d in value.shape), value.nbytes, "numpy"
    raise _invalid(f"tensor '{name}' is a {type(value).__name__}, not a torch tensor or a numpy "
                   "array")


def safetensors_memfd(tensors):
    """Writes `tensors` (a dict name -> torch.Tensor or numpy.ndarray, any device, dtype among
    safetensors') into a new sealed memfd and returns its fd, which the caller closes.

    Raises InvalidArgumentError naming the tensor for an empty or non-string name, a dtype
    safetensors lacks, or a value of another type; OSError for a failing syscall (the memfd is
    closed then).
    """
    if not isinstance(tensors, dict):
        raise _invalid(f"tensors must be a dict name -> tensor, got {type(tensors).__name__}")
    header = {}
    plan = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise _invalid(f"tensor name {name!r} must be a non-empty string other than "
                           "'__metadata__'")
        dtype, shape, nbytes, kind = _describe(name, value)
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        plan.append((name, value, kind, offset, nbytes))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    data_start = 8 + len(text)
    total = data_start + offset

    fd = os.memfd_create("weightd-update", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, total)
        _pwrite_all(fd, len(text).to_bytes(8, "little") + text, 0)
        mm = None
        try:
            for name, value, kind, begin, nbytes in plan:
                if not nbytes:
                    continue
                flat = _host_bytes(value, kind)
                if flat is not None:
                    _pwrite_all(fd, flat, data_start + begin)
                    continue
                if mm is None:
                    mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                _copy_into(mm, data_start + begin, nbytes, value, kind)
        finally:
            # Every view of the mapping is gone by now (each copy drops its own), so the mapping
            # closes; a writable mapping left open would make F_SEAL_WRITE fail with EBUSY.
            if mm is not None:
                mm.close()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _host_bytes(value, kind):
    """`value`'s bytes as a flat byte memoryview when they can be written as they are (host
    memory, C-contiguous, little-endian), else None."""
    if kind == "numpy":
        import numpy as np

        value = np.asarray(value)
        if value.dtype.byteorder == ">" or not value.flags.c_contiguous:
            return None
        return memoryview(value.reshape(-1).view(np.uint8))
    if value.device.type != "cpu" or not value.is_contiguous():
        return None
    import torch

    return memoryview(value.detach().reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd, data, offset):
    """os.pwrite of all of `data` at `offset` (Linux writes at most ~2 GiB per call)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"pwrite into the update's memfd made no progress at offset {offset}")
        view = view[n:]
        offset += n


def _copy_into(mm, start, nbytes, value, kind):
    """Copies `value` (C-order) into mm[start:start + nbytes], the only copy made."""
    if kind == "numpy":
        import numpy as np

        value = np.asarray(value)
        # Little-endian: the file format's byte order, whatever the input's.
        dst_dtype = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        dst = np.frombuffer(mm, dtype=dst_dtype, count=value.size, offset=start)
        try:
            np.copyto(dst.reshape(value.shape), value, casting="no" if dst_dtype == value.dtype
                      else "equiv")
        finally:
            del dst
        return
    import torch

    raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=start)
    try:
        with torch.no_grad():
            # A uint8 view reinterpreted as the tensor's dtype: for CUDA inputs copy_ is one
            # device-to-host transfer into these pages.
            raw.view(value.dtype).view(value.shape).copy_(value)
    finally:
        del raw
