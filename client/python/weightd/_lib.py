"""Loading libweightd_client.so and declaring its C ABI (client/include/weightd/c_api.h).

Lookup order: $WEIGHTD_CLIENT_LIB (a file, or a directory holding libweightd_client.so), then
the package directory, then the system library path (dlopen's search, ctypes.util.find_library).
The library is loaded on first use, so `import weightd` works without it.
"""
import ctypes
import ctypes.util
import os
import threading

from ._errors import WeightdError, error_from_code

_LIB_NAMES = ("libweightd_client.so.0", "libweightd_client.so")
_lock = threading.Lock()
_lib = None


class TensorInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_char_p),
        ("itemsize", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("data", ctypes.c_void_p),
        ("device", ctypes.c_int32),
        ("crc32c", ctypes.c_uint32),
        ("nbytes", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    # Only the trailing deleter is read (to free a capsule that no consumer took).
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("dtype_code", ctypes.c_uint8),
        ("dtype_bits", ctypes.c_uint8),
        ("dtype_lanes", ctypes.c_uint16),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("byte_offset", ctypes.c_uint64),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.CFUNCTYPE(None, ctypes.c_void_p)),
    ]


def _candidates():
    env = os.environ.get("WEIGHTD_CLIENT_LIB")
    if env:
        if os.path.isdir(env):
            return [os.path.join(env, n) for n in _LIB_NAMES], True
        return [env], True
    here = os.path.dirname(os.path.abspath(__file__))
    out = [os.path.join(here, n) for n in _LIB_NAMES if os.path.exists(os.path.join(here, n))]
    out += list(_LIB_NAMES)
    found = ctypes.util.find_library("weightd_client")
    if found:
        out.append(found)
    return out, False


def _declare(lib):
    c_int, c_size, c_char_p, c_void_p = ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p
    pp = ctypes.POINTER
    sigs = {
        "wd_abi_version": (c_int, []),
        "wd_last_error": (c_char_p, []),
        "wd_string_free": (None, [c_void_p]),
        "wd_connect": (c_int, [c_char_p, pp(c_void_p)]),
        "wd_client_free": (None, [c_void_p]),
        "wd_client_version": (c_int, [c_void_p]),
        "wd_list_json": (c_int, [c_void_p, pp(c_void_p)]),
        "wd_status_json": (c_int, [c_void_p, c_char_p, pp(c_void_p)]),
        "wd_load": (c_int, [c_void_p, c_char_p, c_char_p, c_char_p]),
        "wd_unload": (c_int, [c_void_p, c_char_p, c_int]),
        "wd_metrics": (c_int, [c_void_p, pp(c_void_p)]),
        "wd_attach": (c_int, [c_void_p, c_char_p, c_int, pp(c_void_p)]),
        "wd_attachment_retain": (c_void_p, [c_void_p]),
        "wd_attachment_release": (None, [c_void_p]),
        "wd_attachment_refcount": (ctypes.c_int64, [c_void_p]),
        "wd_attachment_model": (c_char_p, [c_void_p]),
        "wd_attachment_rank": (c_int, [c_void_p]),
        "wd_attachment_lease": (ctypes.c_uint64, [c_void_p]),
        "wd_attachment_total_bytes": (ctypes.c_uint64, [c_void_p]),
        "wd_attachment_num_tensors": (c_size, [c_void_p]),
        "wd_attachment_tensor": (c_int, [c_void_p, c_size, pp(TensorInfo)]),
        "wd_attachment_tensors": (c_int, [c_void_p, pp(TensorInfo), c_size]),
        "wd_attachment_find": (c_int, [c_void_p, c_char_p, pp(c_size)]),
        "wd_attachment_verify": (c_int, [c_void_p]),
        "wd_attachment_read": (c_int, [c_void_p, c_size, ctypes.c_uint64, c_void_p,
                                       ctypes.c_uint64]),
        "wd_attachment_detach": (c_int, [c_void_p]),
        "wd_attachment_export_dlpack": (c_int, [c_void_p, c_size, pp(c_void_p)]),
    }
    # ABI 2: generations. A library of ABI 1 lacks them; calling one then raises
    # UnimplementedError (require_abi) instead of failing the import.
    u64 = ctypes.c_uint64
    sigs_v2 = {
        "wd_attachment_generation": (u64, [c_void_p]),
        "wd_attachment_refresh": (c_int, [c_void_p, pp(c_int)]),
        "wd_update": (c_int, [c_void_p, c_char_p, c_char_p, c_int, pp(c_void_p)]),
        "wd_update_fd": (c_int, [c_void_p, c_char_p, c_int, c_int, pp(c_void_p)]),
        "wd_wait_generation": (c_int, [c_void_p, c_char_p, u64, ctypes.c_int64, pp(u64),
                                       pp(c_int)]),
        "wd_rollback": (c_int, [c_void_p, c_char_p, pp(u64)]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args
    for name, (res, args) in sigs_v2.items():
        f = getattr(lib, name, None)
        if f is not None:
            f.restype = res
            f.argtypes = args


def lib():
    """The loaded library (loaded and declared on first call). Raises WeightdError if absent."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        names, from_env = _candidates()
        errors = []
        for n in names:
            try:
                handle = ctypes.CDLL(n)
            except OSError as e:
                errors.append(f"{n}: {e}")
                continue
            _declare(handle)
            if handle.wd_abi_version() < 1:
                errors.append(f"{n}: ABI version {handle.wd_abi_version()} < 1")
                continue
            _lib = handle
            return _lib
        hint = ("WEIGHTD_CLIENT_LIB names it" if from_env else
                "set WEIGHTD_CLIENT_LIB=/path/to/libweightd_client.so (build/client/ in a build "
                "tree) or install it with `cmake --install build` and run ldconfig")
        raise WeightdError(5, "libweightd_client.so not found or not loadable (" + hint +
                           "); tried: " + "; ".join(errors))


def require_abi(version, what):
    """Raises UnimplementedError when the loaded library is older than ABI `version`."""
    have = lib().wd_abi_version()
    if have < version:
        raise error_from_code(12, f"{what} needs libweightd_client ABI {version}; the loaded "
                                  f"library has ABI {have} (install the matching library)")


def check(code):
    """Raises the WeightdError subclass for a non-zero C ABI status code."""
    if code != 0:
        msg = _lib.wd_last_error()
        raise error_from_code(code, msg.decode("utf-8", "replace") if msg else "")


def take_string(ptr):
    """Copies and frees a string returned through `char**`."""
    try:
        return ctypes.string_at(ptr.value).decode("utf-8", "replace")
    finally:
        _lib.wd_string_free(ptr)


# ---- DLPack capsules --------------------------------------------------------------------------

_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_PyCapsule_IsValid = ctypes.pythonapi.PyCapsule_IsValid
_PyCapsule_IsValid.restype = ctypes.c_int
_PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_PyCapsule_GetPointer = ctypes.pythonapi.PyCapsule_GetPointer
_PyCapsule_GetPointer.restype = ctypes.c_void_p
_PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _capsule_destructor(capsule):
    # A consumer renames a capsule it took to "used_dltensor" and owns the tensor from then on;
    # a capsule still called "dltensor" was never consumed, so its tensor is freed here.
    if _PyCapsule_IsValid(capsule, b"dltensor"):
        managed = _PyCapsule_GetPointer(capsule, b"dltensor")
        if managed:
            m = _DLManagedTensor.from_address(managed)
            m.deleter(managed)


_DESTRUCTOR_ADDR = ctypes.cast(_capsule_destructor, ctypes.c_void_p).value


def dlpack_capsule(managed_ptr):
    """Wraps a DLManagedTensor* in a "dltensor" PyCapsule (freed by the consumer's deleter call,
    or by the capsule's destructor if nobody consumed it)."""
    return _PyCapsule_New(managed_ptr, b"dltensor", _DESTRUCTOR_ADDR)
