#include "weightd/model_config.h"

#include <cstdint>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "detail/json_text.h"
#include "weightd/file_util.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {

constexpr uint64_t kMaxConfigBytes = 16ull << 20;

template <typename Map, typename T>
void PutIfAbsent(Map& m, const std::string& k, T v) {
  m.try_emplace(k, std::move(v));
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfig::Parse(absl::string_view json, absl::string_view label) {
  WD_ASSIGN_OR_RETURN(nlohmann::json doc, detail::ParseJsonText(json, label));
  if (!doc.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": top level is not a JSON object"));
  }
  ModelConfig cfg;
  cfg.label_ = std::string(label);
  // Top-level fields first, then `text_config` fills in what the top level lacks.
  auto absorb = [&cfg](const nlohmann::json& obj) {
    for (auto it = obj.begin(); it != obj.end(); ++it) {
      const nlohmann::json& v = it.value();
      if (v.is_boolean()) {
        PutIfAbsent(cfg.bools_, it.key(), v.get<bool>());
      } else if (v.is_number_unsigned()) {
        // Above int64's range the value means nothing to the planner; it is left out rather
        // than wrapped to a negative number.
        if (v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX)) {
          PutIfAbsent(cfg.ints_, it.key(), static_cast<int64_t>(v.get<uint64_t>()));
        }
      } else if (v.is_number_integer()) {
        PutIfAbsent(cfg.ints_, it.key(), v.get<int64_t>());
      } else if (v.is_number_float()) {
        const double d = v.get<double>();
        // Some writers emit integral fields as 4096.0. Converting a double outside int64's
        // range is undefined, so the range is checked first (2^63 is exact in a double).
        if (d >= -0x1p63 && d < 0x1p63 && d == static_cast<double>(static_cast<int64_t>(d))) {
          PutIfAbsent(cfg.ints_, it.key(), static_cast<int64_t>(d));
        }
      } else if (v.is_string()) {
        PutIfAbsent(cfg.strings_, it.key(), v.get<std::string>());
      }
    }
  };
  absorb(doc);
  if (auto tc = doc.find("text_config"); tc != doc.end() && tc->is_object()) absorb(*tc);
  if (auto a = doc.find("architectures"); a != doc.end()) {
    if (!a->is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": 'architectures' must be an array of strings"));
    }
    for (const auto& e : *a) {
      if (!e.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": 'architectures' must be an array of strings"));
      }
      cfg.architectures_.push_back(e.get<std::string>());
    }
  }
  cfg.model_type_ = cfg.GetString("model_type").value_or("");
  return cfg;
}

absl::StatusOr<ModelConfig> ModelConfig::Load(const std::string& path,
                                              absl::Span<const std::string> roots) {
  WD_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, kMaxConfigBytes, roots));
  return Parse(text, path);
}

std::optional<int64_t> ModelConfig::GetInt(absl::string_view key) const {
  auto it = ints_.find(key);
  if (it == ints_.end()) return std::nullopt;
  return it->second;
}

std::optional<bool> ModelConfig::GetBool(absl::string_view key) const {
  auto it = bools_.find(key);
  if (it == bools_.end()) return std::nullopt;
  return it->second;
}

std::optional<std::string> ModelConfig::GetString(absl::string_view key) const {
  auto it = strings_.find(key);
  if (it == strings_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<int64_t> ModelConfig::RequireInt(absl::string_view key,
                                                absl::string_view needed_for) const {
  if (std::optional<int64_t> v = GetInt(key)) return *v;
  return absl::InvalidArgumentError(
      absl::StrCat(label_, ": missing integer field '", key, "', needed for ", needed_for));
}

std::optional<int64_t> ModelConfig::num_key_value_heads() const {
  if (auto v = GetInt("num_key_value_heads")) return v;
  return num_attention_heads();
}

std::optional<int64_t> ModelConfig::HeadDim() const {
  if (auto v = GetInt("head_dim")) return v;
  auto h = hidden_size();
  auto n = num_attention_heads();
  if (!h || !n || *n <= 0) return std::nullopt;
  return *h / *n;
}

std::optional<int64_t> ModelConfig::num_experts() const {
  if (auto v = GetInt("num_local_experts")) return v;
  return GetInt("num_experts");
}

std::optional<std::string> ModelConfig::torch_dtype() const {
  if (auto v = GetString("torch_dtype")) return v;
  return GetString("dtype");
}

}  // namespace weightd
