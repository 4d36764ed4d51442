// BuildPlan: checkpoint + recipe + config + options -> per-rank targets and pieces.
//
// Three phases, each reporting every problem of its kind at once so a user fixes them in one go:
//   1. map: skip, rename and match every checkpoint tensor to a rule (unmapped tensors fail);
//   2. check: shapes against config.json, parameters nothing fills;
//   3. lay out: per target style, the per-rank shape, pieces and zero-fills (divisibility).
#include "weightd/plan.h"

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "detail/json_text.h"
#include "weightd/recipe.h"
#include "weightd/status_macros.h"

namespace weightd {

absl::string_view ParallelStyleName(ParallelStyle s) {
  switch (s) {
    case ParallelStyle::kReplicated:
      return "replicated";
    case ParallelStyle::kColumn:
      return "column";
    case ParallelStyle::kRow:
      return "row";
    case ParallelStyle::kQkv:
      return "qkv";
    case ParallelStyle::kMergedColumn:
      return "merged_column";
    case ParallelStyle::kVocab:
      return "vocab";
    case ParallelStyle::kMoeW13:
      return "moe_w13";
    case ParallelStyle::kMoeW2:
      return "moe_w2";
  }
  return "?";
}

namespace {

constexpr int64_t kVocabPadding = 64;  // vLLM's DEFAULT_VOCAB_PADDING_SIZE

std::string ShapeStr(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

bool IsCastableFloat(DType t) { return t == DType::kBF16 || t == DType::kF16 || t == DType::kF32; }

// Elements of a tensor of shape [first, last): 0 when any dimension is 0 (whatever the others
// are), -1 when a dimension is negative or the product overflows int64.
int64_t Numel(std::vector<int64_t>::const_iterator first,
              std::vector<int64_t>::const_iterator last) {
  if (std::find(first, last, 0) != last) return 0;
  int64_t n = 1;
  for (; first != last; ++first) {
    if (*first < 0 || __builtin_mul_overflow(n, *first, &n)) return -1;
  }
  return n;
}
int64_t Numel(const std::vector<int64_t>& s) { return Numel(s.begin(), s.end()); }

// Checkpoint tensors the planner accepts: every dimension and the byte size below 2^48 (256 TiB).
// Real tensors are far smaller; the bound keeps the layout arithmetic (padding, fused row
// counts, offsets) inside int64 for any header, including zero-element tensors whose other
// dimensions are arbitrary.
constexpr int64_t kMaxPlannedDim = int64_t{1} << 48;

// Longest tensor name the planner maps, as stored or renamed (real names are under 300 bytes).
// Renames could otherwise double a name per rule (a substring replaced by a longer one that
// contains it), and pattern matching is linear in the name.
constexpr size_t kMaxNameBytes = 64 << 10;

// Missing parameters listed in one error.
constexpr size_t kMaxMissingListed = 1000;

// Config lookups with the recipe's defaults and the derived Hugging Face fields.
class ConfigView {
 public:
  ConfigView(const ModelConfig* cfg, const Recipe& recipe) : cfg_(cfg), recipe_(recipe) {}

  std::optional<int64_t> Int(absl::string_view name) const {
    std::optional<int64_t> v;
    if (cfg_ != nullptr) {
      if (name == "head_dim") {
        v = cfg_->HeadDim();
      } else if (name == "num_key_value_heads") {
        v = cfg_->num_key_value_heads();
      } else if (name == "num_experts") {
        v = cfg_->num_experts();
      } else {
        v = cfg_->GetInt(name);
        if (!v) {
          if (auto b = cfg_->GetBool(name)) v = *b ? 1 : 0;
        }
      }
    }
    if (!v) v = Default(name);
    return v;
  }
  bool Bool(absl::string_view name) const {
    if (cfg_ != nullptr) {
      if (auto b = cfg_->GetBool(name)) return *b;
    }
    if (auto d = Default(name)) return *d != 0;
    // Hugging Face's PretrainedConfig default for the one boolean recipes use today.
    return name == "tie_word_embeddings";
  }
  std::string Label() const { return cfg_ ? cfg_->label() : std::string("config.json"); }
  absl::StatusOr<int64_t> Require(absl::string_view name, absl::string_view why) const {
    if (auto v = Int(name)) return *v;
    return absl::InvalidArgumentError(
        absl::StrCat(Label(), ": field '", name, "' is missing; it is needed for ", why));
  }
  // Require, and the value must be at least 1 (a head count, a head size).
  absl::StatusOr<int64_t> RequirePositive(absl::string_view name, absl::string_view why) const {
    WD_ASSIGN_OR_RETURN(int64_t v, Require(name, why));
    if (v < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(Label(), ": '", name, "' is ", v, "; it must be at least 1 for ", why));
    }
    return v;
  }
  // Evaluates "a*b*3"; `fields` receives "a=..., b=..." for messages.
  absl::StatusOr<int64_t> Eval(absl::string_view expr, absl::string_view why,
                               std::vector<std::string>* fields) const {
    int64_t v = 1;
    std::vector<std::string> local;
    if (fields == nullptr) fields = &local;
    for (absl::string_view term : absl::StrSplit(expr, '*')) {
      term = absl::StripAsciiWhitespace(term);
      int64_t t = 0;
      if (!absl::SimpleAtoi(term, &t)) {
        WD_ASSIGN_OR_RETURN(t, Require(term, why));
        fields->push_back(absl::StrCat(term, "=", t));
      }
      if (__builtin_mul_overflow(v, t, &v)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "'", expr, "' overflows 64 bits",
            fields->empty() ? "" : absl::StrCat(" with ", absl::StrJoin(*fields, ", ")), ", in ",
            why));
      }
    }
    return v;
  }

 private:
  std::optional<int64_t> Default(absl::string_view name) const {
    for (const auto& [k, v] : recipe_.config_defaults) {
      if (k == name) return v;
    }
    return std::nullopt;
  }
  const ModelConfig* cfg_;
  const Recipe& recipe_;
};

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

struct Member {
  uint32_t tensor = 0;  // index into ckpt.tensors()
  const ParamRule* rule = nullptr;
  int64_t expert = -1;
};

struct Group {
  std::string target;
  ParallelStyle style = ParallelStyle::kReplicated;
  const ParamRule* rule = nullptr;  // the first rule that mapped here (for messages)
  std::vector<Member> members;
};

// A piece before source indices are known.
struct RawPiece {
  uint32_t tensor = 0;
  PlanPiece p;
};

struct RankTarget {
  std::vector<int64_t> shape;
  std::vector<RawPiece> pieces;
  std::vector<std::pair<int64_t, int64_t>> zero_rows;  // [row, row + n) of dim 0, zeroed
};

// Rows [a, a + n) of dim 0 of a tensor of shape `s` into rows [d, d + n) of plane `p` of a
// target viewed as [planes, D, C] (C = product of the trailing dims; 1-d tensors are one row).
PlanPiece RowsPiece(const std::vector<int64_t>& s, int64_t a, int64_t n, int64_t D, int64_t d,
                    int64_t planes = 1, int64_t p = 0) {
  PlanPiece pc;
  if (s.empty()) return pc;
  if (s.size() == 1) {
    pc.src_shape = {1, 1, s[0]};
    pc.src_start = {0, 0, a};
    pc.extent = {1, 1, n};
    pc.dst_shape = {planes, 1, D};
    pc.dst_start = {p, 0, d};
    return pc;
  }
  // The trailing dimensions' product, not Numel(s) / s[0]: s[0] may be 0.
  const int64_t c = Numel(s.begin() + 1, s.end());
  pc.src_shape = {1, s[0], c};
  pc.src_start = {0, a, 0};
  pc.extent = {1, n, c};
  pc.dst_shape = {planes, D, c};
  pc.dst_start = {p, d, 0};
  return pc;
}

// Columns [c, c + k) of a 2-d tensor [O, K] into plane `p` of a target [planes, O, k].
PlanPiece ColsPiece(const std::vector<int64_t>& s, int64_t c, int64_t k, int64_t planes = 1,
                    int64_t p = 0) {
  PlanPiece pc;
  pc.src_shape = {1, s[0], s[1]};
  pc.src_start = {0, 0, c};
  pc.extent = {1, s[0], k};
  pc.dst_shape = {planes, s[0], k};
  pc.dst_start = {p, 0, 0};
  return pc;
}

void Add(RankTarget* out, uint32_t tensor, PlanPiece piece) {
  out->pieces.push_back({tensor, std::move(piece)});
}

class Builder {
 public:
  Builder(const Checkpoint& ckpt, const PlanOptions& opts, const Recipe& recipe,
          const ModelConfig* cfg)
      : ckpt_(ckpt), opts_(opts), recipe_(recipe), cfg_(cfg, recipe) {}

  absl::StatusOr<Plan> Build();

 private:
  absl::Status MapTensors();
  absl::Status CheckShapesAndCoverage();
  // Rank `rank`'s target of group `g`: its shape, the checkpoint pieces filling it and its
  // zero rows. One function per parallel style; LayOut dispatches.
  absl::Status LayOut(const Group& g, int rank, RankTarget* out) const;
  absl::Status LayOutReplicated(const Group& g, int rank, RankTarget* out) const;
  absl::Status LayOutColumn(const Group& g, int rank, RankTarget* out) const;
  absl::Status LayOutRow(const Group& g, int rank, RankTarget* out) const;
  absl::Status LayOutQkv(const Group& g, int rank, RankTarget* out) const;
  absl::Status LayOutMergedColumn(const Group& g, int rank, RankTarget* out) const;
  absl::Status LayOutVocab(const Group& g, int rank, RankTarget* out) const;
  absl::Status LayOutMoe(const Group& g, int rank, RankTarget* out) const;
  // The single member of a group whose style takes one tensor.
  absl::StatusOr<const Member*> OneMember(const Group& g) const;
  std::string DimLabel(const ParamRule& r, size_t dim) const;
  std::string NearestNames(absl::string_view name) const;
  const CheckpointTensor& T(uint32_t i) const { return ckpt_.tensors()[i]; }
  absl::Status Indivisible(absl::string_view what, int64_t value, absl::string_view tensor) const {
    return absl::InvalidArgumentError(
        absl::StrCat("--tp ", opts_.tp, " does not divide ", what, " (", value, ")",
                     tensor.empty() ? "" : absl::StrCat(" of tensor '", tensor, "'"),
                     "; choose a --tp that divides it"));
  }

  const Checkpoint& ckpt_;
  const PlanOptions& opts_;
  const Recipe& recipe_;
  ConfigView cfg_;
  std::map<std::string, Group> groups_;  // ordered by target name: the plan's target order
  absl::flat_hash_set<std::string> mapped_names_;  // checkpoint names after renames
};

std::string Builder::DimLabel(const ParamRule& r, size_t dim) const {
  if (dim < r.shape.size()) return absl::StrCat(r.shape[dim], ", dim ", dim);
  return absl::StrCat("dim ", dim);
}

std::string Builder::NearestNames(absl::string_view name) const {
  // Candidates: every rule expanded at the layer index the name carries (or 0), expert 0.
  NamePattern::Captures caps;
  std::string layer = "0";
  for (size_t i = 0; i < name.size(); ++i) {
    if (absl::ascii_isdigit(name[i])) {
      size_t j = i;
      while (j < name.size() && absl::ascii_isdigit(name[j])) ++j;
      layer = std::string(name.substr(i, j - i));
      break;
    }
  }
  caps.vars = {{"l", layer}, {"e", "0"}};
  std::vector<std::pair<size_t, std::string>> scored;
  std::set<std::string> seen;
  for (const ParamRule& r : recipe_.params) {
    std::string cand = r.source.Expand(caps);
    if (absl::StrContains(cand, "{") || !seen.insert(cand).second) continue;
    scored.emplace_back(EditDistance(name, cand), cand);
  }
  std::sort(scored.begin(), scored.end());
  std::vector<std::string> best;
  for (size_t i = 0; i < scored.size() && i < 3; ++i) best.push_back(scored[i].second);
  return best.empty() ? "(the recipe has no named parameters)" : absl::StrJoin(best, ", ");
}

absl::Status Builder::MapTensors() {
  std::vector<std::string> unmapped;
  std::string first_unmapped;
  for (uint32_t i = 0; i < ckpt_.tensors().size(); ++i) {
    const std::string& orig = T(i).name;
    auto skipped = [&](absl::string_view n) {
      for (const std::string& s : recipe_.skip) {
        if (absl::StrContains(n, s)) return true;
      }
      for (const std::string& s : opts_.skip_substrings) {
        if (absl::StrContains(n, s)) return true;
      }
      return false;
    };
    if (skipped(orig)) continue;
    if (orig.size() > kMaxNameBytes) {
      return absl::InvalidArgumentError(absl::StrCat("tensor name '", orig.substr(0, 64),
                                                     "...' is ", orig.size(),
                                                     " bytes; the limit is ", kMaxNameBytes));
    }
    std::string name = orig;
    bool dropped = false;
    for (const RenameRule& rr : recipe_.renames) {
      bool hit = false;
      switch (rr.kind) {
        case RenameRule::Kind::kPrefix:
          hit = absl::StartsWith(name, rr.from);
          if (hit && !rr.drop) name = rr.to + name.substr(rr.from.size());
          break;
        case RenameRule::Kind::kSuffix:
          hit = absl::EndsWith(name, rr.from);
          if (hit && !rr.drop) name = name.substr(0, name.size() - rr.from.size()) + rr.to;
          break;
        case RenameRule::Kind::kSubstring:
          hit = absl::StrContains(name, rr.from);
          if (hit && !rr.drop) name = absl::StrReplaceAll(name, {{rr.from, rr.to}});
          break;
      }
      if (name.size() > kMaxNameBytes) {
        return absl::InvalidArgumentError(
            absl::StrCat("renaming tensor '", orig, "' makes its name longer than ", kMaxNameBytes,
                         " bytes (rule ", rr.label, ")"));
      }
      if (hit && rr.drop) {
        dropped = true;
        break;
      }
    }
    if (dropped || skipped(name)) continue;
    const ParamRule* rule = nullptr;
    NamePattern::Captures caps;
    for (const ParamRule& r : recipe_.params) {
      if (r.source.Match(name, &caps)) {
        rule = &r;
        break;
      }
    }
    if (rule == nullptr) {
      if (unmapped.empty()) first_unmapped = orig;
      unmapped.push_back(orig == name ? orig : absl::StrCat(orig, "' (renamed '", name));
      if (unmapped.size() <= 5) {
        unmapped.back() =
            absl::StrCat("'", unmapped.back(), "'; nearest parameter names: ", NearestNames(name));
      } else {
        unmapped.back() = absl::StrCat("'", unmapped.back(), "'");
      }
      continue;
    }
    if (!rule->skip_if_config.empty() && cfg_.Bool(rule->skip_if_config)) continue;
    const CheckpointTensor& ct = T(i);
    if (ct.nbytes >= static_cast<uint64_t>(kMaxPlannedDim) ||
        std::any_of(ct.shape.begin(), ct.shape.end(),
                    [](int64_t d) { return d < 0 || d >= kMaxPlannedDim; })) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", orig, "' has shape ", ShapeStr(ct.shape), " (", ct.nbytes,
          " bytes); weightd plans tensors whose dimensions and byte size are below 2^48"));
    }
    mapped_names_.insert(name);
    Member m;
    m.tensor = i;
    m.rule = rule;
    if (const std::string* e = caps.Get("e")) {
      int64_t v = 0;
      if (!absl::SimpleAtoi(*e, &v) || v >= kMaxPlannedDim) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", orig, "' has expert index ", *e,
                                                       ", which is out of range (rule ",
                                                       rule->label, ")"));
      }
      m.expert = v;
    }
    const std::string target = rule->target.Expand(caps);
    Group& g = groups_[target];
    if (g.rule == nullptr) {
      g.target = target;
      g.rule = rule;
      g.style = rule->style;
    } else if (g.style != rule->style) {
      return absl::InvalidArgumentError(
          absl::StrCat("recipe '", recipe_.name, "': target '", target, "' gets style ",
                       ParallelStyleName(g.style), " from ", g.rule->label, " but ",
                       ParallelStyleName(rule->style), " from ", rule->label));
    }
    g.members.push_back(m);
  }
  if (!unmapped.empty()) {
    const size_t shown = std::min<size_t>(unmapped.size(), 20);
    return absl::InvalidArgumentError(absl::StrCat(
        unmapped.size(), " checkpoint tensor(s) map to no parameter of recipe '", recipe_.name,
        "' (", recipe_.origin, "):\n  ",
        absl::StrJoin(unmapped.begin(), unmapped.begin() + shown, "\n  "),
        unmapped.size() > shown ? absl::StrCat("\n  ... and ", unmapped.size() - shown, " more")
                                : "",
        "\nIf these tensors are not weights the engine uses, skip them with --skip SUBSTRING "
        "(e.g. --skip ",
        std::string(absl::string_view(first_unmapped).substr(first_unmapped.rfind('.') + 1)),
        ") or a \"skip\" rule in a --recipe file; if they are, add a \"params\" rule "
        "(docs/RECIPES.md)."));
  }
  return absl::OkStatus();
}

absl::Status Builder::CheckShapesAndCoverage() {
  // Shapes against config.json.
  for (const auto& [name, g] : groups_) {
    for (const Member& m : g.members) {
      if (m.rule->shape.empty()) continue;
      std::vector<int64_t> want;
      std::vector<std::string> fields;
      for (const std::string& e : m.rule->shape) {
        WD_ASSIGN_OR_RETURN(
            int64_t v, cfg_.Eval(e, absl::StrCat("the shape check of ", m.rule->label), &fields));
        want.push_back(v);
      }
      if (want != T(m.tensor).shape) {
        return absl::InvalidArgumentError(
            absl::StrCat("shape mismatch: tensor '", T(m.tensor).name, "' has shape ",
                         ShapeStr(T(m.tensor).shape), " but config.json implies ", ShapeStr(want),
                         " = [", absl::StrJoin(m.rule->shape, ", "), "] with ",
                         absl::StrJoin(fields, ", "), " (rule ", m.rule->label, ")"));
      }
    }
  }
  // Parameters nothing fills: required rules expanded over layers and experts, and every part
  // of a fused target that received some part.
  // The list stops at kMaxMissingListed: a config.json claiming 10^18 layers must not make the
  // enumeration run for ever (every step past the checkpoint's tensors adds to the list).
  std::set<std::string> missing;
  bool more_missing = false;
  auto note_missing = [&](std::string what) {
    if (missing.size() >= kMaxMissingListed) {
      more_missing = true;
      return false;
    }
    missing.insert(std::move(what));
    return true;
  };
  const std::optional<int64_t> layers = cfg_.Int(recipe_.layers_field);
  const std::optional<int64_t> experts = cfg_.Int("num_experts");
  for (const ParamRule& r : recipe_.params) {
    if (!r.required) continue;
    if (!r.skip_if_config.empty() && cfg_.Bool(r.skip_if_config)) continue;
    const bool has_l = r.source.HasVar("l"), has_e = r.source.HasVar("e");
    if (r.source.HasVar("*")) continue;
    if ((has_l && !layers) || (has_e && !experts)) continue;
    const int64_t nl = has_l ? *layers : 1, ne = has_e ? *experts : 1;
    NamePattern::Captures caps;
    for (int64_t l = 0; l < nl && !more_missing; ++l) {
      for (int64_t e = 0; e < ne && !more_missing; ++e) {
        caps.vars = {{"l", absl::StrCat(l)}, {"e", absl::StrCat(e)}};
        const std::string src = r.source.Expand(caps);
        if (absl::StrContains(src, "{")) continue;  // another placeholder: cannot enumerate
        if (!mapped_names_.contains(src)) {
          note_missing(
              absl::StrCat(r.target.Expand(caps), " (needs checkpoint tensor '", src, "')"));
        }
      }
    }
  }
  for (const auto& [name, g] : groups_) {
    std::set<std::pair<int64_t, int>> have;
    for (const Member& m : g.members) {
      if (!have.insert({m.expert, m.rule->shard}).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("two checkpoint tensors fill the same part of '", name,
                         "', the second is '", T(m.tensor).name, "' (rule ", m.rule->label, ")"));
      }
    }
    std::set<int> shards;
    for (const ParamRule& r : recipe_.params) {
      if (r.style == g.style && r.target.text() == g.rule->target.text()) shards.insert(r.shard);
    }
    // Experts -1 .. -1 for an unfused target, 0 .. num_experts - 1 for a fused one.
    int64_t first_expert = -1, end_expert = 0;
    if (g.style == ParallelStyle::kMoeW13 || g.style == ParallelStyle::kMoeW2) {
      WD_ASSIGN_OR_RETURN(
          int64_t ne,
          cfg_.RequirePositive("num_experts", absl::StrCat("the fused experts of '", name, "'")));
      for (const Member& m : g.members) {
        if (m.expert < 0 || m.expert >= ne) {
          return absl::InvalidArgumentError(
              absl::StrCat("tensor '", T(m.tensor).name, "' is expert ", m.expert, " of '", name,
                           "' but num_experts is ", ne, " (rule ", m.rule->label, ")"));
        }
      }
      first_expert = 0;
      end_expert = ne;
    }
    for (int64_t e = first_expert; e < end_expert && !more_missing; ++e) {
      for (int s : shards) {
        if (have.count({e, s})) continue;
        note_missing(absl::StrCat(name, " (", e >= 0 ? absl::StrCat("expert ", e, ", ") : "",
                                  g.style == ParallelStyle::kQkv && s >= 0 && s < 3
                                      ? std::string(1, "qkv"[s])
                                      : absl::StrCat("part ", s),
                                  " has no checkpoint tensor)"));
      }
    }
  }
  if (!missing.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        more_missing ? "more than " : "", missing.size(), " parameter(s) of recipe '", recipe_.name,
        "' are filled by no checkpoint tensor:\n  ", absl::StrJoin(missing, "\n  "),
        "\nIs the checkpoint complete (all shards listed in the index)? A recipe rule with "
        "\"required\": false makes a parameter optional."));
  }
  return absl::OkStatus();
}

absl::StatusOr<const Member*> Builder::OneMember(const Group& g) const {
  if (g.members.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("target '", g.target, "' (style ",
                                                   ParallelStyleName(g.style), ") is filled by ",
                                                   g.members.size(), " tensors; expected one"));
  }
  return &g.members[0];
}

// Every rank holds the whole tensor.
absl::Status Builder::LayOutReplicated(const Group& g, int /*rank*/, RankTarget* out) const {
  WD_ASSIGN_OR_RETURN(const Member* m, OneMember(g));
  const auto& s = T(m->tensor).shape;
  out->shape = s;
  Add(out, m->tensor, s.empty() ? PlanPiece{} : RowsPiece(s, 0, s[0], s[0], 0));
  return absl::OkStatus();
}

// Rank r holds rows [r·n, (r+1)·n) of dim 0 (n = rows / tp).
absl::Status Builder::LayOutColumn(const Group& g, int r, RankTarget* out) const {
  const int64_t tp = opts_.tp;
  WD_ASSIGN_OR_RETURN(const Member* m, OneMember(g));
  const auto& s = T(m->tensor).shape;
  if (s.empty())
    return absl::InvalidArgumentError(
        absl::StrCat("column style on 0-d tensor '", T(m->tensor).name, "'"));
  if (s[0] % tp) return Indivisible(DimLabel(*m->rule, 0), s[0], T(m->tensor).name);
  const int64_t n = s[0] / tp;
  out->shape = s;
  out->shape[0] = n;
  Add(out, m->tensor, RowsPiece(s, r * n, n, n, 0));
  return absl::OkStatus();
}

// Rank r holds columns [r·k, (r+1)·k) of a 2-d weight; a 1-d bias (added after the
// reduction) is kept whole.
absl::Status Builder::LayOutRow(const Group& g, int r, RankTarget* out) const {
  const int64_t tp = opts_.tp;
  WD_ASSIGN_OR_RETURN(const Member* m, OneMember(g));
  const auto& s = T(m->tensor).shape;
  if (s.size() == 1) {  // a row-parallel bias is added after the reduction: kept whole
    out->shape = s;
    Add(out, m->tensor, RowsPiece(s, 0, s[0], s[0], 0));
    return absl::OkStatus();
  }
  if (s.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("row style needs a 2-d weight or a 1-d bias; '", T(m->tensor).name,
                     "' has shape ", ShapeStr(s)));
  }
  if (s[1] % tp) return Indivisible(DimLabel(*m->rule, 1), s[1], T(m->tensor).name);
  const int64_t k = s[1] / tp;
  out->shape = {s[0], k};
  Add(out, m->tensor, ColsPiece(s, r * k, k));
  return absl::OkStatus();
}

// q, k and v fused by rows: rank r holds its q heads, then its k and v heads (kv heads are
// replicated over tp / num_key_value_heads ranks when tp is larger).
absl::Status Builder::LayOutQkv(const Group& g, int r, RankTarget* out) const {
  const int64_t tp = opts_.tp;
  const Member* part[3] = {nullptr, nullptr, nullptr};
  for (const Member& m : g.members) {
    if (m.rule->shard < 0 || m.rule->shard > 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rule ", m.rule->label, " puts '", T(m.tensor).name, "' in part ", m.rule->shard,
          " of qkv target '", g.target, "'; a qkv part is q, k or v"));
    }
    part[m.rule->shard] = &m;
  }
  // The recipe check (every qkv target pattern has q, k and v rules) and the coverage check
  // make this unreachable; it stays because a null part here would be a crash.
  for (int i = 0; i < 3; ++i) {
    if (part[i] == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("qkv target '", g.target, "' (rule ", g.rule->label,
                       ") has no checkpoint tensor for part ", std::string(1, "qkv"[i])));
    }
  }
  const std::string why = absl::StrCat("the qkv layout of '", g.target, "'");
  WD_ASSIGN_OR_RETURN(int64_t nh, cfg_.RequirePositive("num_attention_heads", why));
  WD_ASSIGN_OR_RETURN(int64_t nkv, cfg_.RequirePositive("num_key_value_heads", why));
  WD_ASSIGN_OR_RETURN(int64_t hd, cfg_.RequirePositive("head_dim", why));
  int64_t want[3];
  if (__builtin_mul_overflow(nh, hd, &want[0]) || __builtin_mul_overflow(nkv, hd, &want[1])) {
    return absl::InvalidArgumentError(
        absl::StrCat(cfg_.Label(), ": num_attention_heads (", nh, ") or num_key_value_heads (",
                     nkv, ") times head_dim (", hd, ") overflows 64 bits, in ", why));
  }
  want[2] = want[1];
  const char* expr[3] = {"num_attention_heads*head_dim", "num_key_value_heads*head_dim",
                         "num_key_value_heads*head_dim"};
  for (int i = 0; i < 3; ++i) {
    const auto& s = T(part[i]->tensor).shape;
    if (s.empty() || s[0] != want[i] ||
        std::vector<int64_t>(s.begin() + 1, s.end()) !=
            std::vector<int64_t>(T(part[0]->tensor).shape.begin() + 1,
                                 T(part[0]->tensor).shape.end())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shape mismatch: tensor '", T(part[i]->tensor).name, "' has shape ", ShapeStr(s),
          " but dim 0 should be ", expr[i], " = ", want[i], " (num_attention_heads=", nh,
          ", num_key_value_heads=", nkv, ", head_dim=", hd, ") and the other dims those of '",
          T(part[0]->tensor).name, "'"));
    }
  }
  if (nh % tp) return Indivisible("num_attention_heads", nh, "");
  if (tp >= nkv && tp % nkv) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tp ", tp, " is larger than num_key_value_heads (", nkv,
                     ") but not a multiple of it: each kv head must be replicated on --tp / ",
                     "num_key_value_heads ranks"));
  }
  if (tp < nkv && nkv % tp) return Indivisible("num_key_value_heads", nkv, "");
  const int64_t q = nh / tp * hd, kv = std::max<int64_t>(1, nkv / tp) * hd;
  const int64_t rep = tp >= nkv ? tp / nkv : 1, s = r / rep;
  const int64_t rows = q + 2 * kv;
  out->shape = T(part[0]->tensor).shape;
  out->shape[0] = rows;
  Add(out, part[0]->tensor, RowsPiece(T(part[0]->tensor).shape, r * q, q, rows, 0));
  Add(out, part[1]->tensor, RowsPiece(T(part[1]->tensor).shape, s * kv, kv, rows, q));
  Add(out, part[2]->tensor, RowsPiece(T(part[2]->tensor).shape, s * kv, kv, rows, q + kv));
  return absl::OkStatus();
}

// Parts (gate/up, ...) fused by rows, each column-sliced: rank r holds its slice of each part,
// in shard order.
absl::Status Builder::LayOutMergedColumn(const Group& g, int r, RankTarget* out) const {
  const int64_t tp = opts_.tp;
  std::vector<const Member*> parts;
  for (const Member& m : g.members) parts.push_back(&m);
  std::sort(parts.begin(), parts.end(),
            [](const Member* a, const Member* b) { return a->rule->shard < b->rule->shard; });
  int64_t rows = 0;
  const auto& s0 = T(parts[0]->tensor).shape;
  for (const Member* m : parts) {
    const auto& s = T(m->tensor).shape;
    if (s.empty() || std::vector<int64_t>(s.begin() + 1, s.end()) !=
                         std::vector<int64_t>(s0.begin() + 1, s0.end())) {
      return absl::InvalidArgumentError(
          absl::StrCat("shape mismatch: the parts of '", g.target, "' differ beyond dim 0: '",
                       T(m->tensor).name, "' ", ShapeStr(s), " vs '", T(parts[0]->tensor).name,
                       "' ", ShapeStr(s0)));
    }
    if (s[0] % tp) return Indivisible(DimLabel(*m->rule, 0), s[0], T(m->tensor).name);
    rows += s[0] / tp;
  }
  out->shape = s0;
  out->shape[0] = rows;
  int64_t d = 0;
  for (const Member* m : parts) {
    const auto& s = T(m->tensor).shape;
    const int64_t n = s[0] / tp;
    Add(out, m->tensor, RowsPiece(s, r * n, n, rows, d));
    d += n;
  }
  return absl::OkStatus();
}

// Rank r holds its share of the vocabulary padded to a multiple of 64; rows past the real
// vocabulary are zero.
absl::Status Builder::LayOutVocab(const Group& g, int r, RankTarget* out) const {
  const int64_t tp = opts_.tp;
  WD_ASSIGN_OR_RETURN(const Member* m, OneMember(g));
  const auto& s = T(m->tensor).shape;
  if (s.empty())
    return absl::InvalidArgumentError(
        absl::StrCat("vocab style on 0-d tensor '", T(m->tensor).name, "'"));
  const int64_t v = s[0];
  const int64_t vp = (v + kVocabPadding - 1) / kVocabPadding * kVocabPadding;
  if (vp % tp) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tp ", tp, " does not divide the padded vocabulary of tensor '", T(m->tensor).name,
        "': ", DimLabel(*m->rule, 0), " has ", v, " rows, padded to a multiple of 64 = ", vp,
        "; choose a --tp that divides ", vp));
  }
  const int64_t p = vp / tp;
  const int64_t start = std::min(r * p, v), end = std::min((r + 1) * p, v);
  out->shape = s;
  out->shape[0] = p;
  if (end > start) Add(out, m->tensor, RowsPiece(s, start, end - start, p, 0));
  if (p > end - start) out->zero_rows.push_back({end - start, p - (end - start)});
  return absl::OkStatus();
}

// Fused experts: w13 [E, 2·Ie/tp, H] (w1 then w3 rows) or w2 [E, H, Ie/tp], each expert sliced;
// with expert parallelism rank r holds its whole experts instead.
absl::Status Builder::LayOutMoe(const Group& g, int r, RankTarget* out) const {
  const int64_t tp = opts_.tp;
  const bool w13 = g.style == ParallelStyle::kMoeW13;
  // CheckShapesAndCoverage checked num_experts >= 1 and every member's expert against it.
  WD_ASSIGN_OR_RETURN(
      int64_t ne, cfg_.RequirePositive("num_experts",
                                       absl::StrCat("the fused experts of '", g.target, "'")));
  for (const Member& m : g.members) {
    if (m.expert < 0 || m.expert >= ne || (w13 && m.rule->shard != 0 && m.rule->shard != 1) ||
        (!w13 && m.rule->shard != 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", T(m.tensor).name, "' is expert ", m.expert, ", part ", m.rule->shard,
          " of '", g.target, "', outside num_experts ", ne, " or the parts of ",
          ParallelStyleName(g.style), " (rule ", m.rule->label, ")"));
    }
  }
  const auto& s0 = T(g.members[0].tensor).shape;
  for (const Member& m : g.members) {
    if (T(m.tensor).shape != s0 || s0.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shape mismatch: experts of '", g.target, "' must all be 2-d of one shape; '",
          T(m.tensor).name, "' is ", ShapeStr(T(m.tensor).shape), ", '",
          T(g.members[0].tensor).name, "' is ", ShapeStr(s0)));
    }
  }
  const int64_t ie = w13 ? s0[0] : s0[1];
  int64_t e0 = 0, ecount = ne, il = ie;
  if (opts_.expert_parallel) {
    if (tp > ne) {
      return absl::InvalidArgumentError(
          absl::StrCat("--expert-parallel with --tp ", tp,
                       " needs at least as many experts: num_experts is ", ne, " (tensor '",
                       g.target, "'); lower --tp or drop --expert-parallel"));
    }
    const int64_t base = ne / tp, rem = ne % tp;
    ecount = base + (r < rem ? 1 : 0);
    e0 = r * base + std::min<int64_t>(r, rem);
  } else {
    if (ie % tp) {
      return Indivisible(absl::StrCat("the expert intermediate size (",
                                      DimLabel(*g.members[0].rule, w13 ? 0 : 1), ")"),
                         ie, T(g.members[0].tensor).name);
    }
    il = ie / tp;
  }
  const int64_t h = w13 ? s0[1] : s0[0];
  out->shape =
      w13 ? std::vector<int64_t>{ecount, 2 * il, h} : std::vector<int64_t>{ecount, h, il};
  std::vector<const Member*> sorted;
  for (const Member& m : g.members) sorted.push_back(&m);
  std::sort(sorted.begin(), sorted.end(), [](const Member* a, const Member* b) {
    return std::pair(a->expert, a->rule->shard) < std::pair(b->expert, b->rule->shard);
  });
  for (const Member* m : sorted) {
    if (m->expert < e0 || m->expert >= e0 + ecount) continue;
    const int64_t pl = m->expert - e0;
    const int64_t off = opts_.expert_parallel ? 0 : r * il;
    if (w13) {
      Add(out, m->tensor, RowsPiece(s0, off, il, 2 * il, m->rule->shard * il, ecount, pl));
    } else {
      Add(out, m->tensor, ColsPiece(s0, off, il, ecount, pl));
    }
  }
  return absl::OkStatus();
}

absl::Status Builder::LayOut(const Group& g, int r, RankTarget* out) const {
  switch (g.style) {
    case ParallelStyle::kReplicated: return LayOutReplicated(g, r, out);
    case ParallelStyle::kColumn: return LayOutColumn(g, r, out);
    case ParallelStyle::kRow: return LayOutRow(g, r, out);
    case ParallelStyle::kQkv: return LayOutQkv(g, r, out);
    case ParallelStyle::kMergedColumn: return LayOutMergedColumn(g, r, out);
    case ParallelStyle::kVocab: return LayOutVocab(g, r, out);
    case ParallelStyle::kMoeW13:
    case ParallelStyle::kMoeW2: return LayOutMoe(g, r, out);
  }
  return absl::InternalError("unknown style");
}

absl::StatusOr<Plan> Builder::Build() {
  WD_RETURN_IF_ERROR(MapTensors());
  WD_RETURN_IF_ERROR(CheckShapesAndCoverage());

  std::vector<int> ranks;
  if (opts_.rank) {
    ranks.push_back(*opts_.rank);
  } else {
    for (int r = 0; r < opts_.tp; ++r) ranks.push_back(r);
  }
  // Lay out every (rank, target) first; sources get their indices once all uses are known.
  // Report the most fundamental divisibility problem first (heads before vocab padding), in
  // the order a user reads a model card, rather than in target-name order.
  for (ParallelStyle first :
       {ParallelStyle::kQkv, ParallelStyle::kMoeW13, ParallelStyle::kMoeW2,
        ParallelStyle::kMergedColumn, ParallelStyle::kColumn, ParallelStyle::kRow}) {
    for (const auto& [name, g] : groups_) {
      RankTarget scratch;
      if (g.style == first) WD_RETURN_IF_ERROR(LayOut(g, ranks[0], &scratch));
    }
  }
  std::vector<std::vector<RankTarget>> per_rank(ranks.size());
  for (size_t ri = 0; ri < ranks.size(); ++ri) {
    per_rank[ri].resize(groups_.size());
    size_t gi = 0;
    for (const auto& [name, g] : groups_)
      WD_RETURN_IF_ERROR(LayOut(g, ranks[ri], &per_rank[ri][gi++]));
  }
  std::vector<uint32_t> used;
  for (const auto& [name, g] : groups_) {
    for (const Member& m : g.members) used.push_back(m.tensor);
  }
  std::sort(used.begin(), used.end(), [&](uint32_t a, uint32_t b) {
    return std::pair(T(a).file, T(a).offset) < std::pair(T(b).file, T(b).offset);
  });
  used.erase(std::unique(used.begin(), used.end()), used.end());

  Plan plan;
  plan.checkpoint = ckpt_.dir();
  plan.recipe = recipe_.name;
  if (ckpt_.config() && !ckpt_.config()->architectures().empty()) {
    plan.architecture = ckpt_.config()->architectures()[0];
  }
  plan.tp = opts_.tp;
  plan.expert_parallel = opts_.expert_parallel;
  plan.checkpoint_bytes = ckpt_.total_bytes();
  for (const CheckpointFile& f : ckpt_.files()) {
    plan.files.push_back({f.path, f.file_size, 0, f.identity});
  }
  absl::flat_hash_map<uint32_t, uint32_t> source_of;
  for (uint32_t t : used) {
    source_of[t] = static_cast<uint32_t>(plan.sources.size());
    const CheckpointTensor& ct = T(t);
    plan.sources.push_back({ct.name, ct.dtype, ct.shape, ct.file, ct.offset, ct.nbytes});
  }
  // Source rows read by any rank, to count each byte once.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rows_read(plan.sources.size());

  for (size_t ri = 0; ri < ranks.size(); ++ri) {
    RankPlan rp;
    rp.rank = ranks[ri];
    uint64_t offset = 0;
    size_t gi = 0;
    for (const auto& [name, g] : groups_) {
      RankTarget& rt = per_rank[ri][gi];
      const uint32_t tix = static_cast<uint32_t>(gi++);
      PlanTarget t;
      t.name = name;
      t.style = g.style;
      t.shape = rt.shape;
      const DType src_dtype = T(g.members[0].tensor).dtype;
      t.dtype = (opts_.dtype && IsCastableFloat(src_dtype)) ? *opts_.dtype : src_dtype;
      for (const Member& m : g.members) {
        const DType d = T(m.tensor).dtype;
        if (d != t.dtype && !(IsCastableFloat(d) && IsCastableFloat(t.dtype))) {
          return absl::InvalidArgumentError(absl::StrCat(
              "target '", name, "' mixes dtypes: '", T(m.tensor).name, "' is ", DTypeName(d),
              " but the target is ", DTypeName(t.dtype), " and only BF16/F16/F32 convert"));
        }
        if (d != t.dtype && (rp.transforms.empty() || rp.transforms.back().target != tix)) {
          rp.transforms.push_back({PlanTransform::Kind::kCast, tix, d, t.dtype});
        }
      }
      // Every target is at most a few planned tensors (each below 2^48 bytes) plus vocab padding;
      // the checks keep even an absurd recipe from wrapping an offset.
      const int64_t numel = Numel(t.shape);
      uint64_t end = 0;
      if (numel < 0 ||
          __builtin_mul_overflow(static_cast<uint64_t>(numel), DTypeSize(t.dtype), &t.nbytes) ||
          t.nbytes > UINT64_MAX - kTargetAlignment ||
          __builtin_add_overflow(offset, t.nbytes + kTargetAlignment - 1, &end)) {
        return absl::InvalidArgumentError(absl::StrCat("target '", name, "' of shape ",
                                                       ShapeStr(t.shape), " on rank ", rp.rank,
                                                       " does not fit in a 64-bit arena"));
      }
      t.offset = offset;
      offset = end / kTargetAlignment * kTargetAlignment;
      const uint64_t row_bytes = t.shape.empty() || t.shape[0] == 0
                                     ? t.nbytes
                                     : t.nbytes / static_cast<uint64_t>(t.shape[0]);
      for (const auto& [row, n] : rt.zero_rows) {
        rp.zero_fills.push_back(
            {tix, static_cast<uint64_t>(row) * row_bytes, static_cast<uint64_t>(n) * row_bytes});
      }
      for (RawPiece& raw : rt.pieces) {
        raw.p.source = source_of[raw.tensor];
        raw.p.target = tix;
        const PlanPiece& p = raw.p;
        for (int64_t i = 0; i < p.extent[0]; ++i) {
          const int64_t first = (p.src_start[0] + i) * p.src_shape[1] + p.src_start[1];
          rows_read[p.source].push_back({first, first + p.extent[1]});
        }
        rp.pieces.push_back(p);
      }
      rp.targets.push_back(std::move(t));
    }
    rp.arena_bytes = offset;
    std::stable_sort(rp.pieces.begin(), rp.pieces.end(),
                     [](const PlanPiece& a, const PlanPiece& b) {
                       return std::tie(a.source, a.src_start, a.target, a.dst_start) <
                              std::tie(b.source, b.src_start, b.target, b.dst_start);
                     });
    plan.ranks.push_back(std::move(rp));
  }
  for (size_t s = 0; s < plan.sources.size(); ++s) {
    auto& iv = rows_read[s];
    std::sort(iv.begin(), iv.end());
    int64_t rows = 0, cur_b = -1, cur_e = -1;
    for (const auto& [b, e] : iv) {
      if (b > cur_e) {
        rows += cur_e - cur_b;
        cur_b = b;
        cur_e = e;
      } else {
        cur_e = std::max(cur_e, e);
      }
    }
    rows += cur_e - cur_b;
    const PlanSource& src = plan.sources[s];
    const int64_t total_rows = src.shape.empty() ? 1 : (src.shape.size() == 1 ? 1 : src.shape[0]);
    const uint64_t bytes = total_rows ? src.nbytes / total_rows * rows : 0;
    plan.files[src.file].read_bytes += bytes;
    plan.read_bytes += bytes;
  }
  return plan;
}

}  // namespace

absl::StatusOr<Plan> BuildPlan(const Checkpoint& ckpt, const PlanOptions& options) {
  if (options.tp < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--tp must be at least 1, got ", options.tp));
  }
  if (options.rank && (*options.rank < 0 || *options.rank >= options.tp)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--rank ", *options.rank, " is outside [0, --tp ", options.tp, ")"));
  }
  if (options.dtype && !IsCastableFloat(*options.dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype ", DTypeName(*options.dtype), " is not one of bf16, fp16, fp32"));
  }
  const ModelConfig* cfg = ckpt.config() ? &*ckpt.config() : nullptr;
  Recipe recipe;
  if (options.recipe_file) {
    WD_ASSIGN_OR_RETURN(recipe, LoadRecipeFile(*options.recipe_file, cfg));
  } else if (options.recipe_name) {
    WD_ASSIGN_OR_RETURN(recipe, BuiltinRecipe(*options.recipe_name));
  } else {
    WD_ASSIGN_OR_RETURN(const ModelConfig* c, ckpt.RequireConfig("choosing a recipe"));
    WD_ASSIGN_OR_RETURN(recipe, RecipeForArchitectures(c->architectures()));
  }
  Builder b(ckpt, options, recipe, cfg);
  return b.Build();
}

// ---------------------------------------------------------------------------------------------
// JSON

namespace {

using nlohmann::json;

json I3(const Index3& a) { return json::array({a[0], a[1], a[2]}); }

}  // namespace

absl::StatusOr<std::string> PlanToJson(const Plan& plan) {
  json j;
  j["format"] = "weightd-plan-1";
  j["checkpoint"] = plan.checkpoint;
  j["recipe"] = plan.recipe;
  j["architecture"] = plan.architecture;
  j["tp"] = plan.tp;
  j["expert_parallel"] = plan.expert_parallel;
  j["checkpoint_bytes"] = plan.checkpoint_bytes;
  j["read_bytes"] = plan.read_bytes;
  j["files"] = json::array();
  for (const PlanFile& f : plan.files) {
    j["files"].push_back(
        {{"path", f.path}, {"file_size", f.file_size}, {"read_bytes", f.read_bytes}});
  }
  j["sources"] = json::array();
  for (const PlanSource& s : plan.sources) {
    j["sources"].push_back({{"name", s.name},
                            {"dtype", DTypeName(s.dtype)},
                            {"shape", s.shape},
                            {"file", s.file},
                            {"offset", s.offset},
                            {"nbytes", s.nbytes}});
  }
  j["ranks"] = json::array();
  for (const RankPlan& r : plan.ranks) {
    json jr;
    jr["rank"] = r.rank;
    jr["arena_bytes"] = r.arena_bytes;
    jr["targets"] = json::array();
    for (const PlanTarget& t : r.targets) {
      jr["targets"].push_back({{"name", t.name},
                               {"dtype", DTypeName(t.dtype)},
                               {"shape", t.shape},
                               {"offset", t.offset},
                               {"nbytes", t.nbytes},
                               {"style", ParallelStyleName(t.style)}});
    }
    jr["pieces"] = json::array();
    for (const PlanPiece& p : r.pieces) {
      jr["pieces"].push_back({{"source", p.source},
                              {"target", p.target},
                              {"src_shape", I3(p.src_shape)},
                              {"src_start", I3(p.src_start)},
                              {"dst_shape", I3(p.dst_shape)},
                              {"dst_start", I3(p.dst_start)},
                              {"extent", I3(p.extent)}});
    }
    jr["zero_fills"] = json::array();
    for (const PlanZeroFill& z : r.zero_fills) {
      jr["zero_fills"].push_back(
          {{"target", z.target}, {"offset", z.offset}, {"nbytes", z.nbytes}});
    }
    jr["transforms"] = json::array();
    for (const PlanTransform& t : r.transforms) {
      jr["transforms"].push_back({{"kind", "cast"},
                                  {"target", t.target},
                                  {"from", DTypeName(t.from)},
                                  {"to", DTypeName(t.to)}});
    }
    j["ranks"].push_back(std::move(jr));
  }
  WD_ASSIGN_OR_RETURN(
      std::string text,
      detail::DumpJsonText(
          j, 1, absl::StrCat("the plan of '", detail::PrintableBytes(plan.checkpoint), "'")));
  return text + "\n";
}

namespace {

// The byte size of `shape` elements of `dtype` is `nbytes`, without overflow.
bool SizeAgrees(const std::vector<int64_t>& shape, DType dtype, uint64_t nbytes) {
  const int64_t n = Numel(shape);
  uint64_t bytes = 0;
  return n >= 0 && !__builtin_mul_overflow(static_cast<uint64_t>(n), DTypeSize(dtype), &bytes) &&
         bytes == nbytes;
}

// The box of a piece lies inside the views of its source and target. The plan may come from a
// file, so every product and sum is overflow-checked.
bool PieceInside(const PlanPiece& p, const PlanSource& s, const PlanTarget& t) {
  auto volume = [](const Index3& a, int64_t* out) {
    return !__builtin_mul_overflow(a[0], a[1], out) && !__builtin_mul_overflow(*out, a[2], out);
  };
  int64_t src = 0, dst = 0;
  if (!volume(p.src_shape, &src) || !volume(p.dst_shape, &dst) || src != Numel(s.shape) ||
      dst != Numel(t.shape)) {
    return false;
  }
  for (int d = 0; d < 3; ++d) {
    int64_t src_end = 0, dst_end = 0;
    if (p.extent[d] < 0 || p.src_start[d] < 0 || p.dst_start[d] < 0 ||
        __builtin_add_overflow(p.src_start[d], p.extent[d], &src_end) ||
        __builtin_add_overflow(p.dst_start[d], p.extent[d], &dst_end) || src_end > p.src_shape[d] ||
        dst_end > p.dst_shape[d]) {
      return false;
    }
  }
  return true;
}

absl::Status CheckPlan(const Plan& plan) {
  auto bad = [](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("plan: ", parts...));
  };
  for (size_t i = 0; i < plan.sources.size(); ++i) {
    const PlanSource& s = plan.sources[i];
    if (s.file >= plan.files.size()) return bad("sources[", i, "] names file ", s.file);
    if (!SizeAgrees(s.shape, s.dtype, s.nbytes)) {
      return bad("sources[", i, "] '", s.name, "': shape and dtype disagree with nbytes");
    }
  }
  for (const RankPlan& r : plan.ranks) {
    for (const PlanTarget& t : r.targets) {
      if (t.offset % kTargetAlignment || t.offset > r.arena_bytes ||
          t.nbytes > r.arena_bytes - t.offset || !SizeAgrees(t.shape, t.dtype, t.nbytes)) {
        return bad("rank ", r.rank, " target '", t.name, "': bad offset, size or shape");
      }
    }
    for (size_t i = 0; i < r.pieces.size(); ++i) {
      const PlanPiece& p = r.pieces[i];
      if (p.source >= plan.sources.size() || p.target >= r.targets.size()) {
        return bad("rank ", r.rank, " pieces[", i, "] index out of range");
      }
      if (!PieceInside(p, plan.sources[p.source], r.targets[p.target])) {
        return bad("rank ", r.rank, " pieces[", i, "] box outside its source or target");
      }
    }
    for (const PlanZeroFill& z : r.zero_fills) {
      if (z.target >= r.targets.size() || z.offset > r.targets[z.target].nbytes ||
          z.nbytes > r.targets[z.target].nbytes - z.offset) {
        return bad("rank ", r.rank, " zero fill outside its target");
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<DType> JDType(const json& j) {
  std::optional<DType> d = ParseDType(j.get<std::string>());
  if (!d) return absl::InvalidArgumentError(absl::StrCat("plan: unknown dtype ", j.dump()));
  return *d;
}

Index3 J3(const json& j) {
  return {j.at(0).get<int64_t>(), j.at(1).get<int64_t>(), j.at(2).get<int64_t>()};
}

absl::StatusOr<Plan> PlanFromJsonImpl(const json& j) {
  Plan plan;
  plan.checkpoint = j.at("checkpoint").get<std::string>();
  plan.recipe = j.at("recipe").get<std::string>();
  plan.architecture = j.at("architecture").get<std::string>();
  plan.tp = j.at("tp").get<int>();
  plan.expert_parallel = j.at("expert_parallel").get<bool>();
  plan.checkpoint_bytes = j.at("checkpoint_bytes").get<uint64_t>();
  plan.read_bytes = j.at("read_bytes").get<uint64_t>();
  for (const json& f : j.at("files")) {
    plan.files.push_back({f.at("path").get<std::string>(), f.at("file_size").get<uint64_t>(),
                          f.at("read_bytes").get<uint64_t>()});
  }
  for (const json& s : j.at("sources")) {
    PlanSource ps;
    ps.name = s.at("name").get<std::string>();
    WD_ASSIGN_OR_RETURN(ps.dtype, JDType(s.at("dtype")));
    ps.shape = s.at("shape").get<std::vector<int64_t>>();
    ps.file = s.at("file").get<uint32_t>();
    ps.offset = s.at("offset").get<uint64_t>();
    ps.nbytes = s.at("nbytes").get<uint64_t>();
    plan.sources.push_back(std::move(ps));
  }
  for (const json& jr : j.at("ranks")) {
    RankPlan r;
    r.rank = jr.at("rank").get<int>();
    r.arena_bytes = jr.at("arena_bytes").get<uint64_t>();
    for (const json& t : jr.at("targets")) {
      PlanTarget pt;
      pt.name = t.at("name").get<std::string>();
      WD_ASSIGN_OR_RETURN(pt.dtype, JDType(t.at("dtype")));
      pt.shape = t.at("shape").get<std::vector<int64_t>>();
      pt.offset = t.at("offset").get<uint64_t>();
      pt.nbytes = t.at("nbytes").get<uint64_t>();
      const std::string style = t.at("style").get<std::string>();
      bool found = false;
      for (int s = 0; s <= static_cast<int>(ParallelStyle::kMoeW2); ++s) {
        if (ParallelStyleName(static_cast<ParallelStyle>(s)) == style) {
          pt.style = static_cast<ParallelStyle>(s);
          found = true;
        }
      }
      if (!found)
        return absl::InvalidArgumentError(absl::StrCat("plan: unknown style '", style, "'"));
      r.targets.push_back(std::move(pt));
    }
    for (const json& p : jr.at("pieces")) {
      PlanPiece pp;
      pp.source = p.at("source").get<uint32_t>();
      pp.target = p.at("target").get<uint32_t>();
      pp.src_shape = J3(p.at("src_shape"));
      pp.src_start = J3(p.at("src_start"));
      pp.dst_shape = J3(p.at("dst_shape"));
      pp.dst_start = J3(p.at("dst_start"));
      pp.extent = J3(p.at("extent"));
      r.pieces.push_back(pp);
    }
    for (const json& z : jr.at("zero_fills")) {
      r.zero_fills.push_back({z.at("target").get<uint32_t>(), z.at("offset").get<uint64_t>(),
                              z.at("nbytes").get<uint64_t>()});
    }
    for (const json& t : jr.at("transforms")) {
      PlanTransform pt;
      pt.target = t.at("target").get<uint32_t>();
      WD_ASSIGN_OR_RETURN(pt.from, JDType(t.at("from")));
      WD_ASSIGN_OR_RETURN(pt.to, JDType(t.at("to")));
      r.transforms.push_back(pt);
    }
    plan.ranks.push_back(std::move(r));
  }
  WD_RETURN_IF_ERROR(CheckPlan(plan));
  return plan;
}

}  // namespace

absl::StatusOr<Plan> PlanFromJson(absl::string_view text) {
  WD_ASSIGN_OR_RETURN(json j, detail::ParseJsonText(text, "plan"));
  // nlohmann reports missing keys and wrong types by exception; they stop here.
  try {
    return PlanFromJsonImpl(j);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("plan: ", e.what()));
  }
}

}  // namespace weightd
