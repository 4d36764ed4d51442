// Header-only helper for tests and benchmarks: writes a Hugging Face-shaped checkpoint whose
// shards have real safetensors headers and sparse (ftruncate'd, all-zero) data sections, so a
// 140 GB Llama-3-70B layout costs a few hundred KB of disk.
#ifndef WEIGHTD_TESTS_SUPPORT_SYNTHETIC_CHECKPOINT_H_
#define WEIGHTD_TESTS_SUPPORT_SYNTHETIC_CHECKPOINT_H_

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace weightd::testing {

struct SyntheticTensor {
  std::string name;
  std::string dtype = "BF16";
  std::vector<int64_t> shape;
};

inline int64_t SyntheticBytes(const SyntheticTensor& t) {
  int64_t n = t.dtype == "F32" ? 4 : 2;
  for (int64_t d : t.shape) n *= d;
  return n;
}

// Writes `tensors` in order, cut into `shards` consecutive files, plus
// config.json with `config_json`. Returns false on an I/O error.
inline bool WriteSyntheticCheckpoint(const std::string& dir,
                                     const std::vector<SyntheticTensor>& tensors, int shards,
                                     const std::string& config_json) {
  std::filesystem::create_directories(dir);
  const size_t per = (tensors.size() + shards - 1) / shards;
  for (int s = 0; s < shards; ++s) {
    std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
    int64_t off = 0;
    for (size_t i = s * per; i < std::min(tensors.size(), (s + 1) * per); ++i) {
      const SyntheticTensor& t = tensors[i];
      const int64_t n = SyntheticBytes(t);
      absl::StrAppend(&header, ",\"", t.name, "\":{\"dtype\":\"", t.dtype, "\",\"shape\":[",
                      absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", off, ",", off + n, "]}");
      off += n;
    }
    header += "}";
    header.append((8 - header.size() % 8) % 8, ' ');
    const std::string path =
        absl::StrFormat("%s/model-%05d-of-%05d.safetensors", dir, s + 1, shards);
    {
      std::ofstream f(path, std::ios::binary | std::ios::trunc);
      uint64_t len = header.size();
      char lb[8];
      for (int i = 0; i < 8; ++i) lb[i] = static_cast<char>((len >> (8 * i)) & 0xFF);
      f.write(lb, 8);
      f.write(header.data(), static_cast<std::streamsize>(header.size()));
      if (!f) return false;
    }
    if (truncate(path.c_str(), static_cast<off_t>(8 + header.size() + off)) != 0) return false;
  }
  std::ofstream c(dir + "/config.json", std::ios::trunc);
  c << config_json;
  return static_cast<bool>(c);
}

// Overwrites the data section of every shard that WriteSyntheticCheckpoint wrote in `dir` with
// pseudo-random bytes drawn from `seed` (xorshift64), so that a test comparing bytes compares
// something other than zeros. The files stop being sparse: this costs their full size on disk.
inline bool FillSyntheticCheckpoint(const std::string& dir, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  std::vector<char> buf(1 << 20);
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() != ".safetensors") continue;
    std::fstream f(e.path(), std::ios::binary | std::ios::in | std::ios::out);
    char lb[8];
    if (!f.read(lb, 8)) return false;
    uint64_t header = 0;
    for (int i = 0; i < 8; ++i)
      header |= static_cast<uint64_t>(static_cast<uint8_t>(lb[i])) << (8 * i);
    const uint64_t size = std::filesystem::file_size(e.path());
    f.seekp(static_cast<std::streamoff>(8 + header));
    for (uint64_t done = 8 + header; done < size;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), size - done));
      for (size_t i = 0; i < n; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::memcpy(buf.data() + i, &x, std::min<size_t>(8, n - i));
      }
      if (!f.write(buf.data(), static_cast<std::streamsize>(n))) return false;
      done += n;
    }
  }
  return true;
}

// A Llama-family layout: H hidden, nh/nkv heads, hd head_dim, inter intermediate, vocab, layers.
inline std::vector<SyntheticTensor> LlamaTensors(int64_t h, int64_t nh, int64_t nkv, int64_t hd,
                                                 int64_t inter, int64_t vocab, int layers,
                                                 bool lm_head = true) {
  std::vector<SyntheticTensor> t;
  t.push_back({"model.embed_tokens.weight", "BF16", {vocab, h}});
  for (int l = 0; l < layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    t.push_back({p + "input_layernorm.weight", "BF16", {h}});
    t.push_back({p + "mlp.down_proj.weight", "BF16", {h, inter}});
    t.push_back({p + "mlp.gate_proj.weight", "BF16", {inter, h}});
    t.push_back({p + "mlp.up_proj.weight", "BF16", {inter, h}});
    t.push_back({p + "post_attention_layernorm.weight", "BF16", {h}});
    t.push_back({p + "self_attn.k_proj.weight", "BF16", {nkv * hd, h}});
    t.push_back({p + "self_attn.o_proj.weight", "BF16", {h, nh * hd}});
    t.push_back({p + "self_attn.q_proj.weight", "BF16", {nh * hd, h}});
    t.push_back({p + "self_attn.v_proj.weight", "BF16", {nkv * hd, h}});
  }
  t.push_back({"model.norm.weight", "BF16", {h}});
  if (lm_head) t.push_back({"lm_head.weight", "BF16", {vocab, h}});
  return t;
}

inline std::string LlamaConfig(int64_t h, int64_t nh, int64_t nkv, int64_t inter, int64_t vocab,
                               int layers, const std::string& arch = "LlamaForCausalLM") {
  return absl::StrFormat(
      R"({"architectures": ["%s"], "hidden_size": %d, "num_attention_heads": %d,
 "num_key_value_heads": %d, "intermediate_size": %d, "vocab_size": %d,
 "num_hidden_layers": %d, "tie_word_embeddings": false, "torch_dtype": "bfloat16"})",
      arch, h, nh, nkv, inter, vocab, layers);
}

}  // namespace weightd::testing

#endif  // WEIGHTD_TESTS_SUPPORT_SYNTHETIC_CHECKPOINT_H_
