#!/usr/bin/env python3
"""Writes the seed corpora of the libFuzzer targets into corpus/<target>/.

Usage: python3 tests/fuzz/make_corpus.py   (rewrites the folders below; commit the result)

  safetensors_header  fuzz_safetensors_header: small whole files (length prefix + header + data),
                      valid ones that reach every branch of a successful parse and broken ones
                      that each stop at a different check.
  recipe_plan         fuzz_recipe_plan: recipe, config.json, tensor lines and options (the
                      format is in fuzz_recipe_plan.cc), from built-in-like models to the recipes
                      and configs that used to crash BuildPlan.
  manifest            fuzz_manifest: attach manifests, encoded here from the layout in
                      common/include/weightd/manifest.h, valid and broken.
  client_reply        fuzz_client_reply: daemon replies (and a manifest after "%%").

corpus/request (fuzz_request) is written by hand. Standard library only, so that the corpora do
not depend on the code under test.
"""
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
EXAMPLE_RECIPE = os.path.join(HERE, "..", "..", "docs", "examples", "recipe-example.json")

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


# --- fuzz_recipe_plan ---------------------------------------------------------------------------

def plan_input(recipe, config, tensors, options=""):
    """recipe/config: dicts or raw text; tensors: list of (name, dtype, shape)."""
    def text(x):
        return x if isinstance(x, str) else json.dumps(x, separators=(",", ":"))
    lines = "\n".join(f"{n} {d} {','.join(map(str, s))}".rstrip() for n, d, s in tensors)
    return "\n%%\n".join([text(recipe), text(config), lines, options]).encode()


def llama_config(h=8, nh=2, nkv=1, inter=16, vocab=10, layers=1, arch="LlamaForCausalLM", **extra):
    c = {"architectures": [arch], "hidden_size": h, "num_attention_heads": nh,
         "num_key_value_heads": nkv, "intermediate_size": inter, "vocab_size": vocab,
         "num_hidden_layers": layers, "tie_word_embeddings": False}
    c.update(extra)
    return c


def llama_tensors(h=8, nh=2, nkv=1, hd=4, inter=16, vocab=10, layers=1, mlp=True):
    t = [("model.embed_tokens.weight", "BF16", [vocab, h]), ("model.norm.weight", "BF16", [h]),
         ("lm_head.weight", "BF16", [vocab, h])]
    for l in range(layers):
        p = f"model.layers.{l}."
        t += [(p + "input_layernorm.weight", "BF16", [h]),
              (p + "post_attention_layernorm.weight", "BF16", [h]),
              (p + "self_attn.q_proj.weight", "BF16", [nh * hd, h]),
              (p + "self_attn.k_proj.weight", "BF16", [nkv * hd, h]),
              (p + "self_attn.v_proj.weight", "BF16", [nkv * hd, h]),
              (p + "self_attn.o_proj.weight", "BF16", [h, nh * hd])]
        if mlp:
            t += [(p + "mlp.gate_proj.weight", "BF16", [inter, h]),
                  (p + "mlp.up_proj.weight", "BF16", [inter, h]),
                  (p + "mlp.down_proj.weight", "BF16", [h, inter])]
    return t


def mixtral_tensors(experts=2, h=8, inter=6, nh=2, nkv=1):
    t = llama_tensors(h=h, nh=nh, nkv=nkv, mlp=False)
    t.append(("model.layers.0.block_sparse_moe.gate.weight", "BF16", [experts, h]))
    for e in range(experts):
        p = f"model.layers.0.block_sparse_moe.experts.{e}."
        t += [(p + "w1.weight", "BF16", [inter, h]), (p + "w2.weight", "BF16", [h, inter]),
              (p + "w3.weight", "BF16", [inter, h])]
    return t


def recipe_plan_seeds():
    auto = {"extends": "auto"}
    yield "llama_tp2", plan_input(auto, llama_config(), llama_tensors(), "tp=2")
    yield "llama_tp4_rank3_f32", plan_input(auto, llama_config(nh=4, nkv=2, head_dim=4),
                                            llama_tensors(nh=4, nkv=2), "tp=4 rank=3 dtype=fp32")
    yield "llama_two_layers_skip", plan_input(
        {"extends": "llama", "skip": ["extra_state"]}, llama_config(layers=2),
        llama_tensors(layers=2) + [("model.extra_state", "U8", [3]), ("model.other", "I32", [1])],
        "tp=2 skip=other")
    yield "qwen2_biases", plan_input(
        auto, llama_config(arch="Qwen2ForCausalLM"),
        llama_tensors() + [("model.layers.0.self_attn.q_proj.bias", "BF16", [8]),
                           ("model.layers.0.self_attn.k_proj.bias", "BF16", [4]),
                           ("model.layers.0.self_attn.v_proj.bias", "BF16", [4])], "tp=2")
    yield "mixtral_ep", plan_input(auto, llama_config(arch="MixtralForCausalLM", intermediate_size=6,
                                                      num_local_experts=2),
                                   mixtral_tensors(), "tp=2 ep")
    yield "mixtral_sliced", plan_input(auto, llama_config(arch="MixtralForCausalLM", intermediate_size=6,
                                                          num_local_experts=2),
                                       mixtral_tensors(), "tp=2")
    with open(EXAMPLE_RECIPE) as f:
        wren = f.read()
    wren_tensors = [("wren.token_table", "F32", [10, 8]), ("wren.unembed", "F32", [10, 8]),
                    ("wren.out_norm.scale", "F32", [8]),
                    ("wren.blocks.0.pre_norm.scale", "F32", [8]),
                    ("wren.blocks.0.mid_norm.scale", "F32", [8]),
                    ("wren.blocks.0.attn.wq", "F32", [8, 8]), ("wren.blocks.0.attn.wk", "F32", [4, 8]),
                    ("wren.blocks.0.attn.wv", "F32", [4, 8]), ("wren.blocks.0.attn.wo", "F32", [8, 8]),
                    ("wren.blocks.0.ffn.w_gate", "F32", [16, 8]),
                    ("wren.blocks.0.ffn.w_up", "F32", [16, 8]),
                    ("wren.blocks.0.ffn.w_down", "F32", [8, 16]),
                    ("wren.blocks.0.attn.rope_cache", "F32", [4])]
    yield "docs_wren_example", plan_input(
        wren, {"architectures": ["WrenForCausalLM"], "hidden_size": 8, "num_attention_heads": 2,
               "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 10,
               "wren_layers": 1}, wren_tensors, "tp=2")
    every_style = {"name": "styles", "config_defaults": {"num_experts": 2}, "rename": [
        {"prefix": "m.", "to": ""}, {"suffix": ".scale", "to": ".weight"},
        {"substring": ".drop.", "drop": True}], "params": [
        {"source": "emb", "style": "vocab", "shape": ["vocab_size", "8"]},
        {"source": "col.{l}", "target": "c.{l}", "style": "column"},
        {"source": "row.{l}", "style": "row"},
        {"source": "g.{l}", "target": "gu.{l}", "style": "merged_column", "shard": 0},
        {"source": "u.{l}", "target": "gu.{l}", "style": "merged_column", "shard": 1},
        {"source": "x.{e}.a", "target": "w13", "style": "moe_w13", "shard": 0},
        {"source": "x.{e}.b", "target": "w13", "style": "moe_w13", "shard": 1},
        {"source": "x.{e}.c", "target": "w2", "style": "moe_w2"},
        {"source": "{*}.weight", "style": "replicated", "required": False}]}
    yield "every_style", plan_input(every_style, {"vocab_size": 7, "num_hidden_layers": 1}, [
        ("m.emb", "F16", [7, 8]), ("col.0", "F32", [4, 3]), ("row.0", "BF16", [3, 4]),
        ("g.0", "BF16", [2, 5]), ("u.0", "BF16", [2, 5]), ("x.0.a", "BF16", [2, 3]),
        ("x.0.b", "BF16", [2, 3]), ("x.0.c", "BF16", [3, 2]), ("x.1.a", "BF16", [2, 3]),
        ("x.1.b", "BF16", [2, 3]), ("x.1.c", "BF16", [3, 2]), ("n.scale", "F32", []),
        ("a.drop.b", "U8", [1])], "tp=2 dtype=bf16")
    yield "huge_zero_element_dims", plan_input(
        {"name": "h", "params": [{"source": "r", "style": "replicated"},
                                 {"source": "v", "style": "vocab"},
                                 {"source": "c", "style": "column"},
                                 {"source": "w", "style": "row"}]},
        "", [("r", "U8", [281474976710655, 0]), ("v", "BF16", [281474976710600, 0]),
             ("c", "F32", [0, 281474976710655]), ("w", "F16", [281474976710655, 0])], "tp=2")
    yield "bad_dim_2_pow_48", plan_input({"extends": "hf"}, "", [("w", "F16", [281474976710656, 0])])
    yield "merged_three_parts_row_bias", plan_input(
        {"name": "m", "params": [
            {"source": "p{n}", "target": "fused", "style": "merged_column", "shard": 0},
            {"source": "q{n}", "target": "fused", "style": "merged_column", "shard": 1},
            {"source": "s{n}", "target": "fused", "style": "merged_column", "shard": 2},
            {"source": "b", "style": "row"}, {"source": "e", "style": "vocab"}]},
        "", [("p0", "F32", [4, 3]), ("q0", "F32", [8, 3]), ("s0", "F32", [4, 3]),
             ("b", "BF16", [6]), ("e", "BF16", [128, 2])], "tp=4")
    yield "ep_more_ranks_than_experts", plan_input(
        auto, llama_config(nh=4, nkv=4, head_dim=4, arch="MixtralForCausalLM", intermediate_size=6,
                           num_local_experts=2),
        mixtral_tensors(nh=4, nkv=4), "tp=4 ep")
    yield "hf_no_config", plan_input({"extends": "hf"}, "", [("a", "I64", [3]), ("b", "BOOL", [])])
    # Inputs that used to crash BuildPlan (see the unit tests of issue 10).
    yield "crash_qkv_without_v", plan_input(
        {"extends": "llama", "params": [
            {"source": "model.layers.{l}.self_attn.v_proj.weight", "style": "replicated"}]},
        llama_config(), llama_tensors(), "tp=2")
    yield "crash_zero_kv_heads", plan_input(auto, llama_config(nkv=0), llama_tensors(nkv=0), "tp=2")
    yield "crash_zero_rows", plan_input(
        {"name": "z", "params": [{"source": "a", "style": "replicated"},
                                 {"source": "b", "style": "column"}]},
        "", [("a", "BF16", [0, 4]), ("b", "F32", [0, 3, 2])], "tp=2")
    one_expert_gate = [(n, d, [1, 8] if n.endswith("moe.gate.weight") else s)
                       for n, d, s in mixtral_tensors()]
    yield "bad_expert_count", plan_input(auto, llama_config(arch="MixtralForCausalLM", intermediate_size=6,
                                                            num_local_experts=1),
                                         one_expert_gate, "tp=2")
    yield "hang_digit_placeholders", plan_input(
        {"name": "x", "params": [{"source": "{n}1{m}1{k}1{j}1{i}1{h}2{g}x", "style": "replicated"},
                                 {"source": "{*}", "style": "replicated", "required": False}]},
        "", [("1" * 300 + "x", "U8", [1])])
    yield "bad_config_json", plan_input(auto, '{"architectures": ["LlamaForCausalLM"], "x": 1e999',
                                        llama_tensors())
    yield "bad_recipe_json", plan_input('{"name": "x", // c\n "params": [', llama_config(),
                                        llama_tensors())


# --- fuzz_manifest ---------------------------------------------------------------------------------

def manifest(model, rank, device, arenas, tensors):
    """arenas: [(size, kind)]; tensors: [(name, dtype, shape, strides, arena, offset, nbytes, crc)].
    The layout of common/include/weightd/manifest.h, version 1, written field by field."""
    strings = model.encode()
    name_at = []
    for t in tensors:
        name_at.append(len(strings))
        strings += t[0].encode()
    arenas_off = 80
    tensors_off = arenas_off + 16 * len(arenas)
    strings_off = tensors_off + 160 * len(tensors)
    total = strings_off + len(strings)
    out = b"WDMANIF\0" + struct.pack("<IIQIIIiQQQQII", 1, 80, total, len(arenas), len(tensors), rank,
                                      device, arenas_off, tensors_off, strings_off, len(strings), 0,
                                      len(model.encode()))
    for size, kind in arenas:
        out += struct.pack("<QII", size, kind, 0)
    for (name, dtype, shape, strides, arena, offset, nbytes, crc), at in zip(tensors, name_at):
        dims = list(shape) + [0] * (7 - len(shape))
        st = list(strides) + [0] * (7 - len(strides))
        out += struct.pack("<IIBBHIQQII", at, len(name.encode()), dtype, len(shape), 0, arena, offset,
                           nbytes, crc, 0)
        out += struct.pack("<7q", *dims) + struct.pack("<7q", *st) + struct.pack("<Q", 0)
    return out + strings


F32, BF16, U8 = 1, 3, 11  # DType codes (common/include/weightd/dtype.h order)


def manifest_seeds():
    yield "valid_one_tensor", manifest("llama", 0, -1, [(4096, 0)],
                                       [("w", F32, [4], [1], 0, 0, 16, 0x1234)])
    yield "valid_empty", manifest("m", 3, -1, [], [])
    yield "valid_device_two_arenas", manifest(
        "qwen", 1, 0, [(1 << 20, 1), (512, 0)],
        [("model.layers.0.self_attn.qkv_proj.weight", BF16, [16, 8], [8, 1], 0, 0, 256, 7),
         ("model.norm.weight", BF16, [8], [1], 1, 256, 16, 9),
         ("scalar", F32, [], [], 1, 0, 4, 0), ("empty", U8, [0, 5], [5, 1], 1, 0, 0, 0),
         ("strided", F32, [2, 3], [1, 2], 0, 1024, 24, 0),
         ("seven_dims", U8, [1, 1, 1, 1, 1, 2, 2], [4, 4, 4, 4, 4, 2, 1], 0, 0, 4, 0)])
    good = manifest("m", 0, -1, [(64, 0)], [("a", F32, [2], [1], 0, 0, 8, 0),
                                            ("b", F32, [2], [1], 0, 8, 8, 0)])
    yield "bad_truncated", good[:-3]
    yield "bad_version", good[:8] + struct.pack("<I", 2) + good[12:]
    yield "bad_tensor_outside_arena", manifest("m", 0, -1, [(8, 0)], [("a", F32, [4], [1], 0, 0, 16, 0)])
    yield "bad_duplicate_name", manifest("m", 0, -1, [(64, 0)], [("a", F32, [2], [1], 0, 0, 8, 0),
                                                                 ("a", F32, [2], [1], 0, 8, 8, 0)])
    yield "bad_arena_index", manifest("m", 0, -1, [(64, 0)], [("a", F32, [2], [1], 1, 0, 8, 0)])
    yield "bad_stride_overflow", manifest("m", 0, -1, [(64, 0)],
                                          [("a", F32, [2, 2], [1 << 62, 1], 0, 0, 16, 0)])
    yield "bad_kind", manifest("m", 0, -1, [(64, 7)], [])


# --- fuzz_client_reply -----------------------------------------------------------------------------

def reply_seeds():
    def ok(result, rid=7):
        return json.dumps({"ok": True, "id": rid, "result": result}).encode()
    yield "hello", ok({"version": 1})
    yield "error", json.dumps({"ok": False, "id": 7, "error": {"code": "NOT_FOUND",
                                                               "message": "no model 'x'"}}).encode()
    yield "refusal_id_null", b'{"ok":false,"id":null,"error":{"code":"UNAVAILABLE","message":"busy"}}'
    yield "other_id", ok({"version": 1}, rid=8)
    yield "metrics", ok({"text": "# HELP weightd_models\nweightd_models 1\n"})
    yield "list", ok({"models": [{"name": "m", "state": "ready", "tp": 2, "ranks": [0, 1]}]})
    yield "status", ok({"models": [{"name": "m", "state": "loading", "checkpoint": "/c", "backend": "host",
                                    "tp": 1, "bytes_total": 100, "bytes_done": 40, "seconds": 0.5,
                                    "ranks": [{"rank": 0, "device": -1, "state": "loading",
                                               "arena_bytes": 4096, "tensors": 3,
                                               "leases": [{"lease": 1, "pid": 10, "uid": 1000}]}]}]})
    host = manifest("m", 0, -1, [(4096, 0)], [("w", F32, [4], [1], 0, 0, 16, 0)])
    yield "attach_host", ok({"lease": 1, "manifest_bytes": len(host), "arenas": 1,
                             "fd_messages": 0}) + b"\n%%\n" + host
    device = manifest("m", 0, 0, [(4096, 1), (4096, 0)], [("w", F32, [4], [1], 0, 0, 16, 0)])
    yield "attach_device", ok({"lease": 2, "manifest_bytes": len(device), "arenas": 2, "fd_messages": 0,
                               "arena_info": [{"kind": "cuda",
                                               "device_uuid": "00112233445566778899aabbccddeeff"},
                                              {"kind": "host"}]}) + b"\n%%\n" + device
    yield "continuation", b'{"ok":true,"id":7,"continuation":1}'
    yield "bad_types", b'{"ok":1,"id":7,"result":{"version":"1","fd_messages":"2"}}'
    yield "bad_result", b'{"ok":true,"id":7,"result":[1,2]}'
    # Generations (docs/PROTOCOL.md "Generations").
    yield "attach_host_generation", ok({"lease": 1, "generation": 3, "manifest_bytes": len(host),
                                        "arenas": 1, "fd_messages": 0}) + b"\n%%\n" + host
    yield "refresh_unchanged", ok({"name": "m", "rank": 0, "lease": 1, "generation": 2,
                                   "unchanged": True})
    yield "refresh_host", ok({"name": "m", "rank": 0, "lease": 1, "generation": 2,
                              "unchanged": False, "manifest_bytes": len(host), "arenas": 1,
                              "fd_messages": 0}) + b"\n%%\n" + host
    yield "update_started", ok({"name": "m", "generation": 2, "state": "updating"})
    yield "update_done", ok({"name": "m", "generation": 2, "state": "ready", "seconds": 0.5,
                             "bytes_read": 4096, "ranks_rewritten": 2, "targets_rewritten": 7,
                             "targets_copied": 3})
    yield "wait_generation", ok({"name": "m", "generation": 3, "timed_out": False})
    yield "rollback", ok({"name": "m", "generation": 4, "restored": 2})
    yield "status_generations", ok({"models": [{
        "name": "m", "state": "ready", "checkpoint": "/c", "backend": "host", "tp": 1,
        "bytes_total": 100, "bytes_done": 100, "seconds": 0.5, "generation": 3,
        "previous_generation": 2,
        "update": {"state": "failed", "generation": 4, "bytes_total": 50, "bytes_done": 10,
                   "seconds": 0.1, "error": "file changed"},
        "ranks": [{"rank": 0, "device": -1, "state": "ready", "arena_bytes": 4096, "tensors": 3,
                   "lease_count": 1,
                   "leases": [{"lease": 1, "pid": 10, "uid": 1000, "generation": 3}]}]}]})
    # Found by fuzz_client_reply: a number beyond uint64 parses as a double (UB when converted).
    yield "crash_float_arena_bytes", (b'{"ok":true,"id":7,"result":{"models":[{"name":"m",'
                                      b'"ranks":[{"rank":0,"arena_bytes":418446744073709551615096}]}]}}')


def write(folder, seeds):
    out = os.path.join(CORPUS, folder)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name, data in seeds:
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


def main():
    write("safetensors_header", seeds())
    write("recipe_plan", recipe_plan_seeds())
    write("manifest", manifest_seeds())
    write("client_reply", reply_seeds())


if __name__ == "__main__":
    main()
