// ModelConfig: the parts of a Hugging Face `config.json` that weightd's planner needs.
//
//   WD_ASSIGN_OR_RETURN(ModelConfig cfg, ModelConfig::Load("/models/llama/config.json"));
//   WD_ASSIGN_OR_RETURN(int64_t heads, cfg.RequireInt("num_attention_heads", "qkv sharding"));
//   int64_t hd = *cfg.HeadDim();   // head_dim if present, else hidden_size / heads
//
// Every top-level scalar (integer, boolean, string) is kept by name, so recipes can refer to
// any config field without a code change. Multimodal configs that nest the language model under
// `text_config` are read from there when a field is absent at the top level.
// Immutable after Load; thread-safe for concurrent reads.
#ifndef WEIGHTD_MODEL_CONFIG_H_
#define WEIGHTD_MODEL_CONFIG_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace weightd {

class ModelConfig {
 public:
  // Parses `json` (the text of a config.json). `label` names the file in error messages.
  static absl::StatusOr<ModelConfig> Parse(absl::string_view json, absl::string_view label);
  // Reads and parses the file at `path`.
  // `roots`: see OpenRegularFile (file_util.h).
  static absl::StatusOr<ModelConfig> Load(const std::string& path,
                                          absl::Span<const std::string> roots = {});

  const std::string& label() const { return label_; }
  // `architectures` (e.g. {"LlamaForCausalLM"}); may be empty.
  const std::vector<std::string>& architectures() const { return architectures_; }
  const std::string& model_type() const { return model_type_; }

  std::optional<int64_t> GetInt(absl::string_view key) const;
  std::optional<bool> GetBool(absl::string_view key) const;
  std::optional<std::string> GetString(absl::string_view key) const;

  // GetInt, or an InvalidArgument error naming the file, the field and `needed_for` (what the
  // caller was about to do with it).
  absl::StatusOr<int64_t> RequireInt(absl::string_view key, absl::string_view needed_for) const;

  // Named accessors for the hyperparameters weightd uses. nullopt when absent.
  std::optional<int64_t> hidden_size() const { return GetInt("hidden_size"); }
  std::optional<int64_t> num_attention_heads() const { return GetInt("num_attention_heads"); }
  // num_key_value_heads, defaulting to num_attention_heads as Hugging Face does.
  std::optional<int64_t> num_key_value_heads() const;
  // head_dim, defaulting to hidden_size / num_attention_heads.
  std::optional<int64_t> HeadDim() const;
  std::optional<int64_t> intermediate_size() const { return GetInt("intermediate_size"); }
  std::optional<int64_t> moe_intermediate_size() const { return GetInt("moe_intermediate_size"); }
  std::optional<int64_t> vocab_size() const { return GetInt("vocab_size"); }
  std::optional<int64_t> num_hidden_layers() const { return GetInt("num_hidden_layers"); }
  // num_local_experts (Mixtral) or num_experts (Qwen-MoE).
  std::optional<int64_t> num_experts() const;
  // tie_word_embeddings; Hugging Face's default is true when the field is absent.
  bool tie_word_embeddings() const { return GetBool("tie_word_embeddings").value_or(true); }
  // torch_dtype (or `dtype`, its newer spelling), e.g. "bfloat16".
  std::optional<std::string> torch_dtype() const;

 private:
  std::string label_;
  std::vector<std::string> architectures_;
  std::string model_type_;
  absl::flat_hash_map<std::string, int64_t> ints_;
  absl::flat_hash_map<std::string, bool> bools_;
  absl::flat_hash_map<std::string, std::string> strings_;
};

}  // namespace weightd

#endif  // WEIGHTD_MODEL_CONFIG_H_
