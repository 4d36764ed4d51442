// Recipe: declarative rules that map a Hugging Face checkpoint's tensors to an engine's
// parameters (names, fusion, parallel style). Built-in recipes are JSON files under
// common/recipes/ compiled into the binary; users add or override rules with their own JSON
// file (docs/RECIPES.md describes the format).
//
//   WD_ASSIGN_OR_RETURN(Recipe r, RecipeForArchitectures(cfg.architectures()));
//   WD_ASSIGN_OR_RETURN(Recipe mine, LoadRecipeFile("my-vlm.json", &cfg));  // may "extend"
//   NamePattern::Captures caps;
//   if (r.params[0].source.Match("model.layers.3.mlp.up_proj.weight", &caps)) ...
//
// Name patterns are literal text with placeholders: `{l}` (layer index) and `{e}` (expert
// index) and any other `{name}` match a run of decimal digits; `{*}` matches any text, possibly
// empty. Matching is plain string comparison with backtracking over placeholders: no regular
// expressions, so mapping 100k tensors against a few dozen rules stays in milliseconds.
//
// Errors (InvalidArgument) name the recipe file and the rule (e.g. "my.json: params[3]").
// Thread-safety: value types, immutable after construction; all functions are thread-safe.
#ifndef WEIGHTD_RECIPE_H_
#define WEIGHTD_RECIPE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/model_config.h"
#include "weightd/plan.h"

namespace weightd {

class NamePattern {
 public:
  // Variable bindings of one match, in pattern order (a handful at most).
  struct Captures {
    std::vector<std::pair<std::string, std::string>> vars;
    const std::string* Get(absl::string_view name) const;
  };

  // Placeholders one pattern may hold.
  static constexpr int kMaxPlaceholders = 16;

  NamePattern() = default;
  // Errors name `label`: an unterminated '{', an empty name, two adjacent placeholders, more
  // than kMaxPlaceholders placeholders.
  static absl::StatusOr<NamePattern> Parse(absl::string_view text, absl::string_view label);

  // True when the whole of `name` matches; fills `caps` (cleared first) if non-null. When
  // several splits match, digit placeholders take the longest run and `{*}` the shortest text,
  // left to right. Time is linear in name length times pattern length whatever the inputs: a
  // backtracking search that runs long hands over to a table of which suffixes can match.
  bool Match(absl::string_view name, Captures* caps) const;
  // The pattern with each placeholder replaced by its capture; a placeholder with no capture is
  // written back as "{name}".
  std::string Expand(const Captures& caps) const;
  bool HasVar(absl::string_view name) const;
  // The placeholders' names in pattern order, repeats included ("l", "e", "*").
  std::vector<std::string> VarNames() const;
  const std::string& text() const { return text_; }

 private:
  struct Segment {
    bool is_var = false;
    std::string text;  // literal text, or the variable name
  };
  int MatchFrom(size_t seg, absl::string_view rest, Captures* caps, size_t* budget) const;
  bool MatchTabled(absl::string_view name, Captures* caps) const;

  std::string text_;
  std::vector<Segment> segments_;
  std::string last_literal_;  // the fixed suffix every match ends with: a cheap pre-filter
};

struct RenameRule {
  enum class Kind : uint8_t { kPrefix, kSubstring, kSuffix };
  Kind kind = Kind::kPrefix;
  std::string from;
  std::string to;     // replacement (ignored when drop)
  bool drop = false;  // a matching tensor is skipped instead of renamed
  std::string label;  // "file: rename[i]", for messages
};

// One checkpoint-tensor pattern and the engine parameter it fills.
struct ParamRule {
  NamePattern source;  // checkpoint name after renames
  NamePattern target;  // engine parameter name; defaults to `source`
  ParallelStyle style = ParallelStyle::kReplicated;
  // Position inside a fused target: qkv 0/1/2 (q/k/v), merged_column and moe_w13 the part
  // index (gate 0, up 1). 0 for unfused targets.
  int shard = 0;
  // A required rule whose pattern holds only {l} and {e} placeholders is expanded over the
  // config's layers and experts; each expansion must be present in the checkpoint.
  bool required = true;
  // When this config boolean is true the rule's tensors are skipped and not required
  // (e.g. lm_head.weight under tie_word_embeddings).
  std::string skip_if_config;
  // Expected shape, one expression per dimension: products of integers and config fields,
  // e.g. "num_attention_heads*head_dim". Empty: not checked.
  std::vector<std::string> shape;
  std::string label;  // "file: params[i]"
};

struct Recipe {
  std::string name;
  std::string origin;  // "built-in" or the file it came from
  std::vector<std::string> architectures;
  std::vector<std::string> skip;  // substrings; a tensor whose name contains one is skipped
  std::vector<RenameRule> renames;
  std::vector<ParamRule> params;  // first match wins
  // Values used when config.json lacks a field (Hugging Face per-model defaults, e.g.
  // tie_word_embeddings is false for Llama but true in PretrainedConfig).
  std::vector<std::pair<std::string, int64_t>> config_defaults;
  std::string layers_field = "num_hidden_layers";
};

// Names of the built-in recipes ("hf", "llama", ...), sorted.
std::vector<std::string> BuiltinRecipeNames();
// Every architecture some built-in recipe serves, sorted.
std::vector<std::string> SupportedArchitectures();
absl::StatusOr<Recipe> BuiltinRecipe(absl::string_view name);

// The built-in recipe serving the first listed architecture that has one. The error lists the
// supported architectures and points to --recipe.
absl::StatusOr<Recipe> RecipeForArchitectures(const std::vector<std::string>& architectures);

// Parses a recipe document. `extends` is resolved against the built-ins ("auto": the one chosen
// from `config`'s architectures, which must then be non-null). Every field is checked, and the
// merged recipe as a whole: one style per target pattern, a rule for each part of a fused target
// (qkv: q, k, v; moe_w13: gate, up; merged_column: 0 to its last part), 'shard' on fused rules
// only, target placeholders captured by the source, shape expressions well-formed, remove_params
// naming base rules. A recipe that passes can be given to BuildPlan with any checkpoint.
absl::StatusOr<Recipe> ParseRecipe(absl::string_view json, absl::string_view label,
                                   const ModelConfig* config);
absl::StatusOr<Recipe> LoadRecipeFile(const std::string& path, const ModelConfig* config);

}  // namespace weightd

#endif  // WEIGHTD_RECIPE_H_
