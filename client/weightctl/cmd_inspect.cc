// weightctl inspect PATH [--json]: what a checkpoint holds, read from its headers only.
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "weightd/args.h"
#include "weightctl/commands.h"
#include "weightd/checkpoint.h"

namespace weightd::cli {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

nlohmann::json ConfigSummaryJson(const ModelConfig& c) {
  nlohmann::json j = nlohmann::json::object();
  j["architectures"] = c.architectures();
  if (!c.model_type().empty()) j["model_type"] = c.model_type();
  auto put = [&](const char* key, std::optional<int64_t> v) {
    if (v) j[key] = *v;
  };
  put("hidden_size", c.hidden_size());
  put("num_hidden_layers", c.num_hidden_layers());
  put("num_attention_heads", c.num_attention_heads());
  put("num_key_value_heads", c.num_key_value_heads());
  put("head_dim", c.HeadDim());
  put("intermediate_size", c.intermediate_size());
  put("moe_intermediate_size", c.moe_intermediate_size());
  put("vocab_size", c.vocab_size());
  put("num_experts", c.num_experts());
  j["tie_word_embeddings"] = c.tie_word_embeddings();
  if (auto d = c.torch_dtype()) j["torch_dtype"] = *d;
  return j;
}

void PrintJson(const Checkpoint& ckpt) {
  nlohmann::json out;
  out["files"] = nlohmann::json::array();
  for (const CheckpointFile& f : ckpt.files()) {
    out["files"].push_back({{"name", f.name},
                            {"path", f.path},
                            {"size", f.file_size},
                            {"data_offset", f.data_offset}});
  }
  out["total_bytes"] = ckpt.total_bytes();
  nlohmann::json tensors = nlohmann::json::array();
  for (const CheckpointTensor& t : ckpt.tensors()) {
    tensors.push_back({{"name", t.name},
                       {"dtype", DTypeName(t.dtype)},
                       {"shape", t.shape},
                       {"file", ckpt.files()[t.file].name},
                       {"offset", t.offset},
                       {"nbytes", t.nbytes}});
  }
  out["tensors"] = std::move(tensors);
  out["config"] = ckpt.config() ? ConfigSummaryJson(*ckpt.config()) : nlohmann::json(nullptr);
  std::cout << out.dump(1, ' ', /*ensure_ascii=*/false,
                        nlohmann::json::error_handler_t::replace)
            << "\n";
}

void PrintTable(const Checkpoint& ckpt) {
  size_t name_w = 4;
  for (const CheckpointTensor& t : ckpt.tensors()) name_w = std::max(name_w, t.name.size());
  name_w = std::min<size_t>(name_w, 72);
  std::cout << absl::StrFormat("%-*s  %-7s  %-20s  %-34s  %14s  %14s\n", name_w, "NAME", "DTYPE",
                               "SHAPE", "FILE", "OFFSET", "BYTES");
  for (const CheckpointTensor& t : ckpt.tensors()) {
    std::cout << absl::StrFormat("%-*s  %-7s  %-20s  %-34s  %14d  %14d\n", name_w, t.name,
                                 DTypeName(t.dtype), ShapeString(t.shape),
                                 ckpt.files()[t.file].name, t.offset, t.nbytes);
  }
  std::cout << "\n"
            << absl::StrFormat("%d tensors, %d file(s), %s of tensor data (%d bytes)\n",
                               ckpt.tensors().size(), ckpt.files().size(),
                               HumanBytes(ckpt.total_bytes()), ckpt.total_bytes());
  if (!ckpt.config()) {
    std::cout << "no config.json beside the shards\n";
    return;
  }
  const ModelConfig& c = *ckpt.config();
  std::cout << "architecture: "
            << (c.architectures().empty() ? std::string("(none listed)")
                                          : absl::StrJoin(c.architectures(), ", "))
            << (c.model_type().empty() ? "" : absl::StrCat(" (model_type ", c.model_type(), ")"))
            << "\n";
  auto line = [](const char* label, std::optional<int64_t> v) {
    if (v) std::cout << absl::StrFormat("  %-22s %d\n", label, *v);
  };
  line("hidden_size", c.hidden_size());
  line("layers", c.num_hidden_layers());
  line("attention heads", c.num_attention_heads());
  line("kv heads", c.num_key_value_heads());
  line("head_dim", c.HeadDim());
  line("intermediate_size", c.intermediate_size());
  line("moe_intermediate_size", c.moe_intermediate_size());
  line("experts", c.num_experts());
  line("vocab_size", c.vocab_size());
  std::cout << absl::StrFormat("  %-22s %s\n", "tie_word_embeddings",
                               c.tie_word_embeddings() ? "true" : "false");
  if (auto d = c.torch_dtype()) std::cout << absl::StrFormat("  %-22s %s\n", "torch_dtype", *d);
}

}  // namespace

int InspectMain(int argc, char** argv) {
  std::string path;
  bool json = false;
  ArgParser p("weightctl inspect",
              "Lists every tensor of a checkpoint (name, dtype, shape, file, absolute data offset, "
              "bytes),\nthe totals and the architecture from config.json. Reads headers only.");
  p.Positional("PATH", &path, "checkpoint directory or a single .safetensors file");
  p.Flag("--json", &json, "print JSON (schema in README.md) instead of a table");
  if (absl::Status s = p.Parse(argc, argv); !s.ok()) {
    std::cerr << "weightctl inspect: " << s.message() << "\n";
    return 2;
  }
  if (p.help_requested()) {
    std::cout << p.Help();
    return 0;
  }
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(path);
  if (!ckpt.ok()) {
    std::cerr << "weightctl inspect: " << ckpt.status().message() << "\n";
    return 1;
  }
  if (json) {
    PrintJson(*ckpt);
  } else {
    PrintTable(*ckpt);
  }
  return 0;
}

}  // namespace weightd::cli
