#!/usr/bin/env python3
"""Writes the seed corpus for fuzz_safetensors_header into corpus/safetensors_header/.

Usage: python3 tests/fuzz/make_corpus.py   (rewrites the folder; commit the result)

Seeds are small whole files (length prefix + header + data): valid ones that reach every branch
of a successful parse, and broken ones that each stop at a different check. Standard library
only, so that the corpus does not depend on the parser under test.
"""
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "safetensors_header")

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
         "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def file_bytes(header_text, data_size, length=None):
    raw = header_text.encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    n = len(raw) if length is None else length
    return n.to_bytes(8, "little") + raw + bytes(range(256)) * (data_size // 256) + bytes(
        data_size % 256)


def file_bytes_raw(raw, data_size):
    """Like file_bytes, for a header given as bytes (which need not be valid UTF-8)."""
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return len(raw).to_bytes(8, "little") + raw + bytes(data_size)


def contiguous(tensors, metadata=None):
    """tensors: list of (name, dtype, shape). Returns (header text, data size)."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return json.dumps(header, separators=(",", ":")), offset


def valid(tensors, metadata=None):
    text, size = contiguous(tensors, metadata)
    return file_bytes(text, size)


def seeds():
    yield "valid_one_tensor", valid([("w", "F32", [2, 3])])
    yield "valid_all_dtypes", valid([(f"t.{d}", d, [2]) for d in SIZES])
    yield "valid_metadata", valid([("model.norm.weight", "BF16", [8])],
                                  {"format": "pt", "note": "x"})
    yield "valid_zero_dim_and_empty", valid([("s", "F64", []), ("e", "I32", [0, 4]),
                                             ("v", "U8", [3])])
    yield "valid_unicode_name", file_bytes(
        '{"caf\\u00e9.\\ud83d\\ude00":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', 1)
    yield "valid_raw_utf8_name", file_bytes(
        '{"caf\u00e9.\u4e2d.\U0001f600":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', 1)
    yield "bad_utf8_name", file_bytes_raw(
        b'{"w\xff\xc0\xaf":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', 1)
    yield "valid_unknown_key", file_bytes(
        '{"w":{"x":[1,{"y":null}],"dtype":"I8","shape":[2],"data_offsets":[0,2]}}', 2)
    yield "valid_empty_header", file_bytes("{}", 0)
    yield "bad_overlap", file_bytes(
        '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
        '"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', 6)
    yield "bad_hole", file_bytes(
        '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
        '"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}', 6)
    yield "bad_trailing_bytes", file_bytes(
        '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', 5)
    yield "bad_size_mismatch", file_bytes(
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4)
    yield "bad_overflow_shape", file_bytes(
        '{"a":{"dtype":"F32","shape":[4611686018427387905],"data_offsets":[0,4]}}', 4)
    yield "bad_reversed_offsets", file_bytes(
        '{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}', 4)
    yield "bad_dtype_and_types", file_bytes(
        '{"a":{"dtype":"F128","shape":"2","data_offsets":[0,2,3]}}', 2)
    yield "bad_metadata_value", file_bytes('{"__metadata__":{"n":1}}', 0)
    yield "bad_duplicate_name", file_bytes(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', 2)
    yield "bad_json_truncated", file_bytes('{"a":{"dtype":"U8","sha', 0)
    yield "bad_nesting", file_bytes('{"a":{"x":' + "[" * 80 + "]" * 80 + "}}", 0)
    yield "bad_length_past_end", file_bytes("{}", 0, length=64)
    yield "bad_short_file", b"\x02\x00\x00"


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    for name, data in seeds():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
