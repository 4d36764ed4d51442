"""Reader of the simulated CUDA driver's counters (tests/sim_cuda/sim_stats.h).

    stats = read_stats(f"{stats_dir}/{pid}.stats")
    stats["races"], stats["pinned_peak"], stats["device"][0]["allocated_bytes"]

The file is one SimStats: little-endian uint64 fields in the order below, no padding. Keep the
field lists in sync with sim_stats.h (fields are only ever appended).
"""
import struct

STATS_FIELDS = (
    "version", "pid", "device_count", "pinned_bytes", "pinned_peak", "races", "misuse",
    "injected", "calls", "kernel_launches",
)
DEVICE_FIELDS = (
    "allocated_bytes", "allocations", "mappings", "reserved_ranges", "primary_ctx_refs",
    "streams", "events", "modules", "lost",
)
MAX_DEVICES = 8
_SIZE = 8 * (len(STATS_FIELDS) + MAX_DEVICES * len(DEVICE_FIELDS))


def read_stats(path):
    """Returns the counters as a dict; "device" is a list of MAX_DEVICES dicts."""
    with open(path, "rb") as f:
        data = f.read(_SIZE)
    if len(data) < _SIZE:
        raise ValueError(f"{path}: {len(data)} bytes, a SimStats has {_SIZE}")
    values = struct.unpack(f"<{_SIZE // 8}Q", data)
    out = dict(zip(STATS_FIELDS, values))
    rest = values[len(STATS_FIELDS):]
    n = len(DEVICE_FIELDS)
    out["device"] = [dict(zip(DEVICE_FIELDS, rest[i * n:(i + 1) * n])) for i in range(MAX_DEVICES)]
    return out
