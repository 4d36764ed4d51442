// Header parsing at DeepSeek scale: how long Checkpoint::Open takes on 100,000 tensors in 100
// shards, and how fast one 1000-tensor header parses from memory.
//
// Method. A synthetic checkpoint is generated once in a temporary directory (TMPDIR or /tmp):
// 100 shards of 1000 BF16 tensors each, named and shaped like DeepSeek-V3 (hidden 7168, MoE
// experts with moe_intermediate_size 2048, MLA attention projections), plus
// model.safetensors.index.json. Each shard is a real safetensors file whose data section is
// created with ftruncate, so the files have their full logical size (~29 GB each) but are sparse:
// nothing but the headers is written to or read from disk. Open only ever reads the headers, so
// the timing is the same as on a real checkpoint whose headers are in the page cache (the first
// iteration warms it; the reported figure is the warm one).
//
//   BM_CheckpointOpen/index    Checkpoint::Open on the directory with its index (what a real
//                              DeepSeek download looks like): header reads + parse + validation +
//                              index parse and cross-check.
//   BM_CheckpointOpen/no_index The same shards (hard links) without an index.
//   BM_ParseHeader             ParseSafetensorsHeader on one shard's 1000-tensor header in memory.
//   BM_NlohmannHeader          nlohmann::json::parse of the same header, no validation: the
//                              baseline a user would reach for.
//
// Reported: wall time (ms) and tensors/s; bytes/s of header JSON for the in-memory benches.
// Target: BM_CheckpointOpen/index < 100 ms on the 2-core development machine.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "weightd/checkpoint.h"
#include "weightd/safetensors.h"

namespace weightd {
namespace {

constexpr int kShards = 100;
constexpr int kTensorsPerShard = 1000;
constexpr int64_t kHidden = 7168;
constexpr int64_t kMoeInter = 2048;
constexpr int64_t kDenseInter = 18432;
constexpr int64_t kExperts = 256;
constexpr int64_t kVocab = 129280;

struct Spec {
  std::string name;
  std::vector<int64_t> shape;
};

// DeepSeek-V3-shaped tensor names, layer by layer, until `count` tensors exist.
std::vector<Spec> DeepSeekLikeTensors(size_t count) {
  std::vector<Spec> out;
  out.reserve(count + 1024);
  out.push_back({"model.embed_tokens.weight", {kVocab, kHidden}});
  out.push_back({"model.norm.weight", {kHidden}});
  out.push_back({"lm_head.weight", {kVocab, kHidden}});
  for (int l = 0; out.size() < count; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    out.push_back({p + "input_layernorm.weight", {kHidden}});
    out.push_back({p + "post_attention_layernorm.weight", {kHidden}});
    out.push_back({p + "self_attn.q_a_proj.weight", {1536, kHidden}});
    out.push_back({p + "self_attn.q_a_layernorm.weight", {1536}});
    out.push_back({p + "self_attn.q_b_proj.weight", {128 * 192, 1536}});
    out.push_back({p + "self_attn.kv_a_proj_with_mqa.weight", {576, kHidden}});
    out.push_back({p + "self_attn.kv_a_layernorm.weight", {512}});
    out.push_back({p + "self_attn.kv_b_proj.weight", {128 * 256, 512}});
    out.push_back({p + "self_attn.o_proj.weight", {kHidden, 128 * 128}});
    if (l < 3) {
      out.push_back({p + "mlp.gate_proj.weight", {kDenseInter, kHidden}});
      out.push_back({p + "mlp.up_proj.weight", {kDenseInter, kHidden}});
      out.push_back({p + "mlp.down_proj.weight", {kHidden, kDenseInter}});
      continue;
    }
    out.push_back({p + "mlp.gate.weight", {kExperts, kHidden}});
    out.push_back({p + "mlp.gate.e_score_correction_bias", {kExperts}});
    for (int e = 0; e < kExperts; ++e) {
      const std::string ep = absl::StrCat(p, "mlp.experts.", e, ".");
      out.push_back({ep + "gate_proj.weight", {kMoeInter, kHidden}});
      out.push_back({ep + "up_proj.weight", {kMoeInter, kHidden}});
      out.push_back({ep + "down_proj.weight", {kHidden, kMoeInter}});
    }
    out.push_back({p + "mlp.shared_experts.gate_proj.weight", {kMoeInter, kHidden}});
    out.push_back({p + "mlp.shared_experts.up_proj.weight", {kMoeInter, kHidden}});
    out.push_back({p + "mlp.shared_experts.down_proj.weight", {kHidden, kMoeInter}});
  }
  out.resize(count);
  return out;
}

// The header JSON of one shard (BF16, contiguous offsets) and its data section size.
std::pair<std::string, uint64_t> ShardHeader(const std::vector<Spec>& specs, size_t begin,
                                             size_t end) {
  std::string json = R"({"__metadata__":{"format":"pt"})";
  uint64_t offset = 0;
  for (size_t i = begin; i < end; ++i) {
    uint64_t n = 2;
    for (int64_t d : specs[i].shape) n *= static_cast<uint64_t>(d);
    absl::StrAppend(&json, ",\"", specs[i].name, "\":{\"dtype\":\"BF16\",\"shape\":[");
    for (size_t k = 0; k < specs[i].shape.size(); ++k) {
      absl::StrAppend(&json, k ? "," : "", specs[i].shape[k]);
    }
    absl::StrAppend(&json, "],\"data_offsets\":[", offset, ",", offset + n, "]}");
    offset += n;
  }
  json += "}";
  while (json.size() % 8 != 0) json.push_back(' ');
  return {std::move(json), offset};
}

void WriteOrDie(const std::string& path, const std::string& bytes, uint64_t total_size) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || ::write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size()) ||
      ::ftruncate(fd, static_cast<off_t>(total_size)) != 0 || ::close(fd) != 0) {
    std::perror(path.c_str());
    std::exit(1);
  }
}

class SyntheticCheckpoint {
 public:
  SyntheticCheckpoint() {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = absl::StrCat(tmp ? tmp : "/tmp", "/weightd_bench_XXXXXX");
    if (::mkdtemp(tmpl.data()) == nullptr) {
      std::perror("mkdtemp");
      std::exit(1);
    }
    root_ = tmpl;
    with_index_ = root_ + "/index";
    no_index_ = root_ + "/no_index";
    std::filesystem::create_directories(with_index_);
    std::filesystem::create_directories(no_index_);
    const std::vector<Spec> specs = DeepSeekLikeTensors(kShards * kTensorsPerShard);
    std::string index = R"({"metadata":{"total_size":0},"weight_map":{)";
    for (int s = 0; s < kShards; ++s) {
      const std::string file = absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, kShards);
      auto [json, data_size] = ShardHeader(specs, static_cast<size_t>(s) * kTensorsPerShard,
                                           static_cast<size_t>(s + 1) * kTensorsPerShard);
      std::string prefix(8, '\0');
      for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((json.size() >> (8 * i)) & 0xFF);
      const std::string path = absl::StrCat(with_index_, "/", file);
      WriteOrDie(path, prefix + json, 8 + json.size() + data_size);
      std::filesystem::create_hard_link(path, absl::StrCat(no_index_, "/", file));
      if (s == 0) first_header_ = {json, data_size};
      for (int i = 0; i < kTensorsPerShard; ++i) {
        absl::StrAppend(&index, (s || i) ? "," : "", "\"",
                        specs[static_cast<size_t>(s) * kTensorsPerShard + i].name, "\":\"", file,
                        "\"");
      }
    }
    index += "}}";
    WriteOrDie(with_index_ + "/model.safetensors.index.json", index, index.size());
  }
  ~SyntheticCheckpoint() {
    std::error_code ec;
    std::filesystem::remove_all(root_, ec);
  }

  const std::string& with_index() const { return with_index_; }
  const std::string& no_index() const { return no_index_; }
  const std::pair<std::string, uint64_t>& first_header() const { return first_header_; }

 private:
  std::string root_, with_index_, no_index_;
  std::pair<std::string, uint64_t> first_header_;
};

const SyntheticCheckpoint& Fixture() {
  static const SyntheticCheckpoint* ckpt = new SyntheticCheckpoint();
  return *ckpt;
}

void BM_CheckpointOpen(benchmark::State& state, bool with_index) {
  const std::string& dir = with_index ? Fixture().with_index() : Fixture().no_index();
  size_t tensors = 0;
  for (auto _ : state) {
    absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(dir);
    if (!ckpt.ok()) {
      state.SkipWithError(std::string(ckpt.status().message()).c_str());
      return;
    }
    tensors = ckpt->tensors().size();
    benchmark::DoNotOptimize(tensors);
  }
  state.counters["tensors"] = static_cast<double>(tensors);
  state.counters["tensors/s"] = benchmark::Counter(static_cast<double>(tensors),
                                                   benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK_CAPTURE(BM_CheckpointOpen, index, true)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);
BENCHMARK_CAPTURE(BM_CheckpointOpen, no_index, false)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

void BM_ParseHeader(benchmark::State& state) {
  const auto& [json, data_size] = Fixture().first_header();
  for (auto _ : state) {
    absl::StatusOr<SafetensorsHeader> h = ParseSafetensorsHeader(json, data_size, "bench");
    if (!h.ok()) {
      state.SkipWithError(std::string(h.status().message()).c_str());
      return;
    }
    benchmark::DoNotOptimize(h->tensors.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * json.size()));
  state.counters["tensors/s"] =
      benchmark::Counter(kTensorsPerShard, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_ParseHeader)->Unit(benchmark::kMillisecond);

void BM_NlohmannHeader(benchmark::State& state) {
  const std::string& json = Fixture().first_header().first;
  for (auto _ : state) {
    nlohmann::json doc = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
    benchmark::DoNotOptimize(doc.size());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * json.size()));
  state.counters["tensors/s"] =
      benchmark::Counter(kTensorsPerShard, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_NlohmannHeader)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace weightd

BENCHMARK_MAIN();
