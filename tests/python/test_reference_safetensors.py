"""weightctl inspect against files written by the reference implementation (PyPI `safetensors`).

The expectations come from numpy and the reference writer, never from weightd: names, dtypes and
shapes are what we asked safetensors to save, and the bytes at each reported (offset, nbytes)
must be the numpy array's own bytes.

Run: WEIGHTCTL=/path/to/weightctl python3 -m pytest -q tests/python/test_reference_safetensors.py
"""
import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.numpy import save_file

WEIGHTCTL = os.environ.get("WEIGHTCTL")

pytestmark = pytest.mark.skipif(not WEIGHTCTL, reason="set WEIGHTCTL to the built weightctl")

# The safetensors spelling of each numpy dtype, written out here rather than taken from weightd.
NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# dtypes numpy lacks: written as an unsigned type of the same width, then retagged.
RETAGGED_DTYPES = {"BF16": np.uint16, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8}


def random_array(rng, dtype, shape):
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(size=shape).astype(dtype)


def inspect(path):
    proc = subprocess.run([WEIGHTCTL, "inspect", str(path), "--json"], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout)


def read_header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def retag(path, new_dtypes):
    """Changes the header dtype string of the tensors in `new_dtypes` (name -> dtype).

    The byte size must stay the same; the header is re-serialized and padded with spaces to a
    multiple of 8, as the reference writer does, and the data section is kept byte for byte.
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    for name, dtype in new_dtypes.items():
        header[name]["dtype"] = dtype
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.write(data)


def check(report, expected, ckpt_dir):
    """`expected`: name -> (safetensors dtype, numpy array). Compares every field and the bytes."""
    files = {f["name"]: f for f in report["files"]}
    got_names = [t["name"] for t in report["tensors"]]
    assert got_names == sorted(expected, key=lambda s: s.encode())
    total = 0
    for t in report["tensors"]:
        dtype, arr = expected[t["name"]]
        assert t["dtype"] == dtype, t["name"]
        assert t["shape"] == list(arr.shape), t["name"]
        assert t["nbytes"] == arr.nbytes, t["name"]
        assert files[t["file"]]["data_offset"] <= t["offset"], t["name"]
        with open(os.path.join(ckpt_dir, t["file"]), "rb") as f:
            f.seek(t["offset"])
            got = f.read(t["nbytes"])
        assert got == np.ascontiguousarray(arr).tobytes(), t["name"]
        total += arr.nbytes
    assert report["total_bytes"] == total
    for name, f in files.items():
        assert f["size"] == os.path.getsize(os.path.join(ckpt_dir, name))


def test_numpy_native_dtypes(tmp_path):
    rng = np.random.default_rng(1)
    shapes = [(7,), (3, 5), (2, 3, 4), (1, 1, 1, 9)]
    expected = {}
    for i, (st, np_dtype) in enumerate(NUMPY_DTYPES.items()):
        arr = random_array(rng, np_dtype, shapes[i % len(shapes)])
        expected[f"model.layers.{i}.{st.lower()}.weight"] = (st, arr)
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, (_, v) in expected.items()}, str(path))
    check(inspect(path), expected, tmp_path)


def test_retagged_dtypes(tmp_path):
    rng = np.random.default_rng(2)
    expected = {}
    for st, carrier in RETAGGED_DTYPES.items():
        expected[f"w.{st}"] = (st, random_array(rng, carrier, (4, 6)))
        expected[f"v.{st}"] = (st, random_array(rng, carrier, (3,)))
    expected["plain"] = ("F32", random_array(rng, np.float32, (5,)))
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, (_, v) in expected.items()}, str(path))
    retag(path, {k: st for k, (st, _) in expected.items() if st in RETAGGED_DTYPES})
    assert read_header(path)["w.BF16"]["dtype"] == "BF16"
    check(inspect(path), expected, tmp_path)


def test_all_dtypes_in_one_file(tmp_path):
    rng = np.random.default_rng(3)
    expected = {}
    for st, np_dtype in {**NUMPY_DTYPES, **RETAGGED_DTYPES}.items():
        expected[f"t.{st}"] = (st, random_array(rng, np_dtype, (3, 2)))
    path = tmp_path / "all.safetensors"
    save_file({k: v for k, (_, v) in expected.items()}, str(path))
    retag(path, {k: st for k, (st, _) in expected.items() if st in RETAGGED_DTYPES})
    report = inspect(path)
    assert sorted(t["dtype"] for t in report["tensors"]) == sorted(
        list(NUMPY_DTYPES) + list(RETAGGED_DTYPES))
    check(report, expected, tmp_path)


def test_zero_dim_and_empty_tensors(tmp_path):
    rng = np.random.default_rng(4)
    expected = {
        "scalar.f32": ("F32", np.array(3.5, dtype=np.float32)),
        "scalar.i64": ("I64", np.array(-7, dtype=np.int64)),
        "scalar.bool": ("BOOL", np.array(True)),
        "empty.row": ("F32", np.zeros((0,), dtype=np.float32)),
        "empty.mid": ("I16", np.zeros((2, 0, 3), dtype=np.int16)),
        "empty.bf16": ("BF16", np.zeros((0, 8), dtype=np.uint16)),
        "dense": ("F16", random_array(rng, np.float16, (4, 4))),
    }
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, (_, v) in expected.items()}, str(path))
    retag(path, {"empty.bf16": "BF16"})
    report = inspect(path)
    shapes = {t["name"]: t["shape"] for t in report["tensors"]}
    assert shapes["scalar.f32"] == []
    assert shapes["empty.mid"] == [2, 0, 3]
    check(report, expected, tmp_path)


def test_metadata_and_unicode_names(tmp_path):
    rng = np.random.default_rng(5)
    expected = {
        "caf\u00e9.\u4e2d\u6587.weight": ("F32", random_array(rng, np.float32, (2, 2))),
        'quote".and\\backslash': ("U8", random_array(rng, np.uint8, (3,))),
    }
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, (_, v) in expected.items()}, str(path),
              metadata={"format": "pt", "note": "\u00e9 \"quoted\" {not json}"})
    assert read_header(path)["__metadata__"]["format"] == "pt"
    check(inspect(path), expected, tmp_path)


def test_multi_shard_checkpoint_with_index(tmp_path):
    rng = np.random.default_rng(6)
    expected = {}
    layers = 4
    for layer in range(layers):
        p = f"model.layers.{layer}."
        expected[p + "self_attn.q_proj.weight"] = ("BF16", random_array(rng, np.uint16, (32, 16)))
        expected[p + "mlp.down_proj.weight"] = ("F32", random_array(rng, np.float32, (16, 24)))
        expected[p + "input_layernorm.weight"] = ("F16", random_array(rng, np.float16, (16,)))
    expected["model.embed_tokens.weight"] = ("BF16", random_array(rng, np.uint16, (50, 16)))
    expected["model.norm.weight"] = ("F32", random_array(rng, np.float32, (16,)))
    names = sorted(expected)
    nshards = 3
    weight_map = {}
    for i in range(nshards):
        fname = f"model-{i + 1:05d}-of-{nshards:05d}.safetensors"
        shard = names[i::nshards]
        save_file({n: expected[n][1] for n in shard}, str(tmp_path / fname),
                  metadata={"format": "pt"})
        retag(tmp_path / fname, {n: "BF16" for n in shard if expected[n][0] == "BF16"})
        weight_map.update({n: fname for n in shard})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": sum(a.nbytes for _, a in expected.values())},
                   "weight_map": weight_map}, f)
    # A stray shard that the index does not name must not be picked up.
    save_file({"stray": np.zeros(3, dtype=np.float32)}, str(tmp_path / "stray.safetensors"))
    report = inspect(tmp_path)
    assert sorted(f["name"] for f in report["files"]) == sorted(set(weight_map.values()))
    for t in report["tensors"]:
        assert t["file"] == weight_map[t["name"]], t["name"]
    check(report, expected, tmp_path)


@pytest.mark.parametrize("corruption", ["truncated_data", "extra_data", "huge_header_length",
                                        "header_length_past_end", "garbled_json", "wrong_dtype"])
def test_corrupted_file_fails_naming_the_file(tmp_path, corruption):
    rng = np.random.default_rng(7)
    path = tmp_path / "broken-model.safetensors"
    save_file({"a": random_array(rng, np.float32, (8, 8)),
               "b": random_array(rng, np.int64, (5,))}, str(path))
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    if corruption == "truncated_data":
        raw = raw[:-3]
    elif corruption == "extra_data":
        raw += b"\0" * 8
    elif corruption == "huge_header_length":
        raw[:8] = (1 << 40).to_bytes(8, "little")
    elif corruption == "header_length_past_end":
        raw[:8] = (len(raw)).to_bytes(8, "little")
    elif corruption == "garbled_json":
        raw[8 + n // 2] = ord("\\")
    elif corruption == "wrong_dtype":
        # Same length, so only the dtype × shape check can notice.
        header = bytes(raw[8:8 + n]).replace(b'"dtype":"I64"', b'"dtype":"I32"')
        assert header != bytes(raw[8:8 + n])
        raw[8:8 + n] = header
    path.write_bytes(bytes(raw))
    proc = subprocess.run([WEIGHTCTL, "inspect", str(path), "--json"], capture_output=True)
    assert proc.returncode == 1, proc.stdout
    assert "broken-model.safetensors" in proc.stderr.decode(errors="replace")
    assert proc.stdout == b""
