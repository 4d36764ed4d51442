// Recipe parsing, merging (extends), built-in lookup and name patterns.
#include "weightd/recipe.h"

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "detail/builtin_recipes.h"
#include "detail/json_text.h"
#include "weightd/file_util.h"
#include "weightd/status_macros.h"

namespace weightd {

// ---------------------------------------------------------------------------------------------
// NamePattern

const std::string* NamePattern::Captures::Get(absl::string_view name) const {
  for (const auto& [k, v] : vars) {
    if (k == name) return &v;
  }
  return nullptr;
}

absl::StatusOr<NamePattern> NamePattern::Parse(absl::string_view text, absl::string_view label) {
  NamePattern p;
  p.text_ = std::string(text);
  size_t i = 0;
  int vars = 0;
  while (i < text.size()) {
    if (text[i] == '{') {
      const size_t close = text.find('}', i);
      if (close == absl::string_view::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": pattern '", text, "' has an unterminated '{'"));
      }
      const absl::string_view name = text.substr(i + 1, close - i - 1);
      if (name.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": pattern '", text, "' has an empty placeholder '{}'"));
      }
      if (!p.segments_.empty() && p.segments_.back().is_var) {
        // Two adjacent placeholders could split the same text in several ways.
        return absl::InvalidArgumentError(absl::StrCat(
            label, ": pattern '", text, "' has two adjacent placeholders; separate them by text"));
      }
      if (++vars > kMaxPlaceholders) {
        return absl::InvalidArgumentError(absl::StrCat(
            label, ": pattern '", text, "' has more than ", kMaxPlaceholders, " placeholders"));
      }
      p.segments_.push_back({true, std::string(name)});
      i = close + 1;
    } else {
      size_t next = text.find('{', i);
      if (next == absl::string_view::npos) next = text.size();
      p.segments_.push_back({false, std::string(text.substr(i, next - i))});
      i = next;
    }
  }
  if (!p.segments_.empty() && !p.segments_.back().is_var) p.last_literal_ = p.segments_.back().text;
  return p;
}

std::vector<std::string> NamePattern::VarNames() const {
  std::vector<std::string> out;
  for (const Segment& s : segments_) {
    if (s.is_var) out.push_back(s.text);
  }
  return out;
}

bool NamePattern::HasVar(absl::string_view name) const {
  for (const Segment& s : segments_) {
    if (s.is_var && s.text == name) return true;
  }
  return false;
}

bool NamePattern::Match(absl::string_view name, Captures* caps) const {
  if (!absl::EndsWith(name, last_literal_)) return false;
  Captures local;
  Captures* c = caps ? caps : &local;
  c->vars.clear();
  // Backtracking is the fast path (a real name matches or fails in a few steps), but several
  // placeholders over a long name can take exponential time ("{a}1{b}1{c}1{d}2x" against a
  // thousand 1s). Past this many steps the table decides, in time linear in the name.
  size_t budget = 64 * (segments_.size() + 1) + 4 * name.size();
  const int r = MatchFrom(0, name, c, &budget);
  if (r >= 0) return r == 1;
  c->vars.clear();
  return MatchTabled(name, c);
}

// 1: matched (captures in `caps`), 0: no match, -1: `*budget` steps ran out first.
int NamePattern::MatchFrom(size_t seg, absl::string_view rest, Captures* caps,
                           size_t* budget) const {
  if (*budget == 0) return -1;
  --*budget;
  if (seg == segments_.size()) return rest.empty() ? 1 : 0;
  const Segment& s = segments_[seg];
  if (!s.is_var) {
    if (!absl::StartsWith(rest, s.text)) return 0;
    return MatchFrom(seg + 1, rest.substr(s.text.size()), caps, budget);
  }
  const bool any = s.text == "*";
  size_t max_len = rest.size();
  if (!any) {
    max_len = 0;
    while (max_len < rest.size() && rest[max_len] >= '0' && rest[max_len] <= '9') ++max_len;
  }
  // Digit runs are tried longest first, `{*}` shortest first; the next literal decides.
  for (size_t k = 0; k <= max_len; ++k) {
    const size_t len = any ? k : max_len - k;
    if (!any && len == 0) break;
    caps->vars.emplace_back(s.text, std::string(rest.substr(0, len)));
    const int r = MatchFrom(seg + 1, rest.substr(len), caps, budget);
    if (r != 0) return r;
    caps->vars.pop_back();
  }
  return 0;
}

// The same search without backtracking: first, for every segment s and position p, whether
// segments s.. can match name[p..] (from the last segment back, a prefix count making each
// placeholder's range of end positions one subtraction); then the captures, choosing at each
// placeholder the first length in MatchFrom's order whose remainder can match, which is the
// split MatchFrom would have returned.
bool NamePattern::MatchTabled(absl::string_view name, Captures* caps) const {
  const size_t n = name.size(), segs = segments_.size();
  std::vector<uint8_t> ok((segs + 1) * (n + 1), 0);
  auto at = [&](size_t s, size_t p) -> uint8_t& { return ok[s * (n + 1) + p]; };
  at(segs, n) = 1;
  std::vector<size_t> digits(n + 1, 0);  // length of the digit run starting at each position
  for (size_t p = n; p-- > 0;) digits[p] = absl::ascii_isdigit(name[p]) ? digits[p + 1] + 1 : 0;
  std::vector<size_t> below(n + 2, 0);  // below[q]: positions before q where segment s+1 matches
  for (size_t s = segs; s-- > 0;) {
    const Segment& g = segments_[s];
    if (!g.is_var) {
      for (size_t p = 0; p + g.text.size() <= n; ++p) {
        at(s, p) = at(s + 1, p + g.text.size()) && name.compare(p, g.text.size(), g.text) == 0;
      }
      continue;
    }
    for (size_t q = 0; q <= n; ++q) below[q + 1] = below[q] + at(s + 1, q);
    const bool any = g.text == "*";
    for (size_t p = 0; p <= n; ++p) {
      if (!any && digits[p] == 0) continue;
      const size_t first = any ? p : p + 1, last = any ? n : p + digits[p];
      at(s, p) = below[last + 1] > below[first];
    }
  }
  if (!at(0, 0)) return false;
  size_t p = 0;
  for (size_t s = 0; s < segs; ++s) {
    const Segment& g = segments_[s];
    if (!g.is_var) {
      p += g.text.size();
      continue;
    }
    size_t len = g.text == "*" ? 0 : digits[p];
    if (g.text == "*") {
      while (!at(s + 1, p + len)) ++len;
    } else {
      while (!at(s + 1, p + len)) --len;
    }
    caps->vars.emplace_back(g.text, std::string(name.substr(p, len)));
    p += len;
  }
  return true;
}

std::string NamePattern::Expand(const Captures& caps) const {
  std::string out;
  for (const Segment& s : segments_) {
    if (!s.is_var) {
      out += s.text;
    } else if (const std::string* v = caps.Get(s.text)) {
      out += *v;
    } else {
      absl::StrAppend(&out, "{", s.text, "}");
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Parsing

namespace {

using nlohmann::json;

absl::Status Bad(absl::string_view where, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(where, ": ", what));
}

absl::StatusOr<ParallelStyle> ParseStyle(const std::string& s, absl::string_view where) {
  static const std::pair<const char*, ParallelStyle> kStyles[] = {
      {"replicated", ParallelStyle::kReplicated},
      {"column", ParallelStyle::kColumn},
      {"row", ParallelStyle::kRow},
      {"qkv", ParallelStyle::kQkv},
      {"merged_column", ParallelStyle::kMergedColumn},
      {"vocab", ParallelStyle::kVocab},
      {"moe_w13", ParallelStyle::kMoeW13},
      {"moe_w2", ParallelStyle::kMoeW2},
  };
  for (const auto& [name, style] : kStyles) {
    if (s == name) return style;
  }
  return Bad(where, absl::StrCat("unknown style '", s,
                                 "'; expected one of replicated, column, row, qkv, "
                                 "merged_column, vocab, moe_w13, moe_w2"));
}

absl::Status CheckKeys(const json& obj, std::initializer_list<const char*> allowed,
                       absl::string_view where) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    bool ok = false;
    for (const char* a : allowed) ok = ok || it.key() == a;
    if (!ok) {
      return Bad(where, absl::StrCat("unknown key '", it.key(),
                                     "'; allowed: ", absl::StrJoin(allowed, ", ")));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> StringList(const json& obj, const char* key,
                                                    absl::string_view where) {
  std::vector<std::string> out;
  if (!obj.contains(key)) return out;
  const json& a = obj.at(key);
  if (!a.is_array()) return Bad(where, absl::StrCat("'", key, "' must be an array of strings"));
  for (const json& v : a) {
    if (!v.is_string()) {
      return Bad(where, absl::StrCat("'", key, "' must be an array of strings"));
    }
    out.push_back(v.get<std::string>());
  }
  return out;
}

absl::StatusOr<std::string> OptString(const json& obj, const char* key, absl::string_view where) {
  if (!obj.contains(key)) return std::string();
  if (!obj.at(key).is_string()) return Bad(where, absl::StrCat("'", key, "' must be a string"));
  return obj.at(key).get<std::string>();
}

bool IsFused(ParallelStyle s) {
  return s == ParallelStyle::kQkv || s == ParallelStyle::kMergedColumn ||
         s == ParallelStyle::kMoeW13;
}

// The name of part `shard` of a fused target, for messages: q/k/v, gate/up, or the index.
std::string PartName(ParallelStyle style, int shard) {
  if (style == ParallelStyle::kQkv && shard >= 0 && shard < 3) return std::string(1, "qkv"[shard]);
  if (style == ParallelStyle::kMoeW13 && (shard == 0 || shard == 1)) {
    return shard == 0 ? "0 (gate)" : "1 (up)";
  }
  return absl::StrCat(shard);
}

// "shard": required for the fused styles (it is the part's position), refused for the others.
absl::Status ParseShard(const json& j, absl::string_view where, ParamRule* r) {
  const absl::string_view style = ParallelStyleName(r->style);
  if (!j.contains("shard")) {
    if (!IsFused(r->style)) return absl::OkStatus();
    const char* parts = r->style == ParallelStyle::kQkv      ? "\"q\", \"k\" or \"v\""
                        : r->style == ParallelStyle::kMoeW13 ? "0 (gate) or 1 (up)"
                                                             : "the part's index (0, 1, ...)";
    return Bad(where, absl::StrCat("a ", style, " rule needs 'shard': ", parts));
  }
  if (!IsFused(r->style)) {
    return Bad(where, absl::StrCat("'shard' applies to qkv, merged_column and moe_w13 rules "
                                   "only; a ",
                                   style, " rule fills its whole target"));
  }
  const json& s = j.at("shard");
  if (r->style == ParallelStyle::kQkv) {
    // 0, 1, 2 are accepted as the positions of q, k, v.
    for (int part = 0; part < 3; ++part) {
      if ((s.is_string() && s.get_ref<const std::string&>() == std::string(1, "qkv"[part])) ||
          (s.is_number_integer() && s == part)) {
        r->shard = part;
        return absl::OkStatus();
      }
    }
    return Bad(where, "a qkv rule's 'shard' must be \"q\", \"k\" or \"v\"");
  }
  const int64_t limit = r->style == ParallelStyle::kMoeW13 ? 2 : 64;
  if (!s.is_number_integer() || (s.is_number_unsigned() && s.get<uint64_t>() >= 64) ||
      s.get<int64_t>() < 0 || s.get<int64_t>() >= limit) {
    return Bad(where, r->style == ParallelStyle::kMoeW13
                          ? "a moe_w13 rule's 'shard' must be 0 (gate) or 1 (up)"
                          : "a merged_column rule's 'shard' must be an integer in [0, 64)");
  }
  r->shard = static_cast<int>(s.get<int64_t>());
  return absl::OkStatus();
}

// A shape expression: integers and config field names joined by '*' (what ConfigView::Eval
// reads).
absl::Status CheckShapeExpr(absl::string_view expr, size_t dim, absl::string_view where) {
  auto bad = [&]() {
    return Bad(where, absl::StrCat("shape[", dim, "] '", expr,
                                   "' is not a product of integers and config field names, e.g. "
                                   "\"num_attention_heads*head_dim\""));
  };
  for (absl::string_view term : absl::StrSplit(expr, '*')) {
    term = absl::StripAsciiWhitespace(term);
    if (term.empty()) return bad();
    if (absl::ascii_isdigit(term[0])) {
      int64_t v = 0;
      if (!absl::SimpleAtoi(term, &v)) return bad();
      continue;
    }
    if (!absl::ascii_isalpha(term[0]) && term[0] != '_') return bad();
    for (const char c : term) {
      if (!absl::ascii_isalnum(c) && c != '_') return bad();
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ParamRule> ParseParam(const json& j, const std::string& where) {
  if (!j.is_object()) return Bad(where, "a param rule must be an object");
  WD_RETURN_IF_ERROR(CheckKeys(
      j, {"source", "target", "style", "shard", "required", "skip_if_config", "shape", "comment"},
      where));
  ParamRule r;
  r.label = where;
  WD_ASSIGN_OR_RETURN(std::string source, OptString(j, "source", where));
  if (source.empty()) return Bad(where, "missing 'source' pattern");
  WD_ASSIGN_OR_RETURN(std::string target, OptString(j, "target", where));
  if (target.empty()) target = source;
  WD_ASSIGN_OR_RETURN(r.source, NamePattern::Parse(source, where));
  WD_ASSIGN_OR_RETURN(r.target, NamePattern::Parse(target, where));
  WD_ASSIGN_OR_RETURN(std::string style, OptString(j, "style", where));
  if (style.empty()) return Bad(where, "missing 'style'");
  WD_ASSIGN_OR_RETURN(r.style, ParseStyle(style, where));
  WD_RETURN_IF_ERROR(ParseShard(j, where, &r));
  if (j.contains("required")) {
    if (!j.at("required").is_boolean()) return Bad(where, "'required' must be true or false");
    r.required = j.at("required").get<bool>();
  }
  WD_ASSIGN_OR_RETURN(r.skip_if_config, OptString(j, "skip_if_config", where));
  WD_ASSIGN_OR_RETURN(r.shape, StringList(j, "shape", where));
  for (size_t d = 0; d < r.shape.size(); ++d)
    WD_RETURN_IF_ERROR(CheckShapeExpr(r.shape[d], d, where));
  // Every placeholder of the target must be bound by the source; a source binds each once.
  const std::vector<std::string> source_vars = r.source.VarNames();
  for (size_t i = 0; i < source_vars.size(); ++i) {
    if (std::find(source_vars.begin(), source_vars.begin() + i, source_vars[i]) !=
        source_vars.begin() + i) {
      return Bad(where, absl::StrCat("source pattern '", source, "' has the placeholder {",
                                     source_vars[i], "} twice"));
    }
  }
  for (const std::string& v : r.target.VarNames()) {
    if (!r.source.HasVar(v)) {
      return Bad(where,
                 absl::StrCat("target pattern '", target, "' uses {", v,
                              "}, which the source pattern '", source, "' does not capture"));
    }
  }
  const bool moe = r.style == ParallelStyle::kMoeW13 || r.style == ParallelStyle::kMoeW2;
  if (moe && !r.source.HasVar("e")) {
    return Bad(where, "a moe_w13/moe_w2 rule's source must capture the expert index as {e}");
  }
  if (moe && r.target.HasVar("e")) {
    return Bad(where, "a moe_w13/moe_w2 rule's target must not contain {e}: experts are fused");
  }
  return r;
}

// Overlay rules come first so that they win; a base rule with the same source pattern is
// replaced, and `remove` drops base rules by source pattern.
absl::StatusOr<Recipe> Merge(const Recipe& base, Recipe overlay,
                             const std::vector<std::string>& remove, absl::string_view where) {
  for (size_t i = 0; i < remove.size(); ++i) {
    const bool found = std::any_of(base.params.begin(), base.params.end(), [&](const ParamRule& r) {
      return r.source.text() == remove[i];
    });
    if (!found) {
      return Bad(where, absl::StrCat("remove_params[", i, "] '", remove[i],
                                     "' is the source of no rule of recipe '", base.name, "'"));
    }
  }
  Recipe out = std::move(overlay);
  std::set<std::string> seen;
  for (const ParamRule& r : out.params) seen.insert(r.source.text());
  for (const std::string& r : remove) seen.insert(r);
  for (const ParamRule& r : base.params) {
    if (!seen.count(r.source.text())) out.params.push_back(r);
  }
  std::vector<std::string> skip = base.skip;
  for (std::string& s : out.skip) {
    if (std::find(skip.begin(), skip.end(), s) == skip.end()) skip.push_back(std::move(s));
  }
  out.skip = std::move(skip);
  // Overlay renames run first: they typically strip a wrapper prefix (a VLM's
  // "language_model.") before the base's rules see the name.
  out.renames.insert(out.renames.end(), base.renames.begin(), base.renames.end());
  for (const auto& kv : base.config_defaults) {
    const bool overridden = std::any_of(out.config_defaults.begin(), out.config_defaults.end(),
                                        [&](const auto& o) { return o.first == kv.first; });
    if (!overridden) out.config_defaults.push_back(kv);
  }
  if (out.architectures.empty()) out.architectures = base.architectures;
  return out;
}

// Checks across rules, on the recipe as BuildPlan uses it (after `extends`): the rules naming one
// target pattern agree on its style, and a fused target has a rule for every part (qkv: q, k
// and v; moe_w13: gate and up; merged_column: 0 up to its highest part).
absl::Status CheckTargets(const Recipe& r, absl::string_view where) {
  std::map<std::string, std::vector<const ParamRule*>> by_target;
  for (const ParamRule& p : r.params) by_target[p.target.text()].push_back(&p);
  for (const auto& [target, rules] : by_target) {
    const ParamRule& first = *rules[0];
    for (const ParamRule* p : rules) {
      if (p->style != first.style) {
        return Bad(where, absl::StrCat("target '", target, "' gets style ",
                                       ParallelStyleName(first.style), " from ", first.label,
                                       " but ", ParallelStyleName(p->style), " from ", p->label,
                                       "; the rules of one target must agree on its style"));
      }
    }
    if (!IsFused(first.style)) continue;
    std::set<int> parts;
    for (const ParamRule* p : rules) parts.insert(p->shard);
    const int need = first.style == ParallelStyle::kQkv      ? 3
                     : first.style == ParallelStyle::kMoeW13 ? 2
                                                             : *parts.rbegin() + 1;
    for (int part = 0; part < need; ++part) {
      if (parts.count(part)) continue;
      std::vector<std::string> have;
      for (const ParamRule* p : rules) {
        have.push_back(absl::StrCat(p->label, " (part ", PartName(p->style, p->shard), ")"));
      }
      return Bad(where, absl::StrCat(ParallelStyleName(first.style), " target '", target,
                                     "' has no rule for part ", PartName(first.style, part),
                                     "; its rules: ", absl::StrJoin(have, ", "),
                                     ". A fused target needs a rule for each of its parts"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Recipe> ParseRecipeImpl(absl::string_view text, absl::string_view label,
                                       const ModelConfig* config, int depth) {
  if (depth > 8) return Bad(label, "'extends' chain is longer than 8 (a cycle?)");
  WD_ASSIGN_OR_RETURN(json j, detail::ParseJsonText(text, label, /*allow_comments=*/true));
  if (!j.is_object()) return Bad(label, "a recipe must be a JSON object");
  const std::string where(label);
  WD_RETURN_IF_ERROR(
      CheckKeys(j,
                {"name", "description", "extends", "architectures", "skip", "rename", "params",
                 "remove_params", "config_defaults", "layers_field", "comment"},
                where));
  Recipe r;
  r.origin = where;
  WD_ASSIGN_OR_RETURN(r.name, OptString(j, "name", where));
  WD_ASSIGN_OR_RETURN(r.architectures, StringList(j, "architectures", where));
  WD_ASSIGN_OR_RETURN(r.skip, StringList(j, "skip", where));
  for (size_t i = 0; i < r.skip.size(); ++i) {
    if (r.skip[i].empty()) {
      return Bad(where, absl::StrCat("skip[", i, "] is empty; it would skip every tensor"));
    }
  }
  WD_ASSIGN_OR_RETURN(std::string layers_field, OptString(j, "layers_field", where));
  if (j.contains("layers_field") && layers_field.empty()) {
    return Bad(where, "'layers_field' must name a config field");
  }
  if (!layers_field.empty()) r.layers_field = layers_field;
  if (j.contains("config_defaults")) {
    const json& d = j.at("config_defaults");
    if (!d.is_object()) return Bad(where, "'config_defaults' must be an object");
    for (auto it = d.begin(); it != d.end(); ++it) {
      if (it->is_boolean()) {
        r.config_defaults.emplace_back(it.key(), it->get<bool>() ? 1 : 0);
      } else if (it->is_number_integer() &&
                 !(it->is_number_unsigned() &&
                   it->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))) {
        r.config_defaults.emplace_back(it.key(), it->get<int64_t>());
      } else {
        return Bad(where, absl::StrCat("config_defaults.", it.key(),
                                       " must be a 64-bit integer or a boolean"));
      }
    }
  }
  if (j.contains("rename")) {
    if (!j.at("rename").is_array()) return Bad(where, "'rename' must be an array");
    int i = 0;
    for (const json& e : j.at("rename")) {
      const std::string w = absl::StrCat(where, ": rename[", i++, "]");
      if (!e.is_object()) return Bad(w, "a rename rule must be an object");
      WD_RETURN_IF_ERROR(
          CheckKeys(e, {"prefix", "substring", "suffix", "to", "drop", "comment"}, w));
      RenameRule rr;
      rr.label = w;
      int kinds = 0;
      for (auto [key, kind] : {std::pair{"prefix", RenameRule::Kind::kPrefix},
                               std::pair{"substring", RenameRule::Kind::kSubstring},
                               std::pair{"suffix", RenameRule::Kind::kSuffix}}) {
        if (e.contains(key)) {
          ++kinds;
          rr.kind = kind;
          WD_ASSIGN_OR_RETURN(rr.from, OptString(e, key, w));
        }
      }
      if (kinds != 1 || rr.from.empty()) {
        return Bad(w, "needs exactly one non-empty 'prefix', 'substring' or 'suffix'");
      }
      if (e.contains("drop")) {
        if (!e.at("drop").is_boolean()) return Bad(w, "'drop' must be true or false");
        rr.drop = e.at("drop").get<bool>();
      }
      if (!rr.drop && !e.contains("to")) return Bad(w, "needs 'to' (or \"drop\": true)");
      WD_ASSIGN_OR_RETURN(rr.to, OptString(e, "to", w));
      r.renames.push_back(std::move(rr));
    }
  }
  if (j.contains("params")) {
    if (!j.at("params").is_array()) return Bad(where, "'params' must be an array");
    int i = 0;
    for (const json& e : j.at("params")) {
      WD_ASSIGN_OR_RETURN(ParamRule p, ParseParam(e, absl::StrCat(where, ": params[", i++, "]")));
      r.params.push_back(std::move(p));
    }
  }
  WD_ASSIGN_OR_RETURN(std::vector<std::string> remove, StringList(j, "remove_params", where));
  WD_ASSIGN_OR_RETURN(std::string extends, OptString(j, "extends", where));
  if (extends.empty()) {
    if (!remove.empty()) return Bad(where, "'remove_params' needs 'extends'");
    if (r.name.empty()) return Bad(where, "missing 'name'");
    WD_RETURN_IF_ERROR(CheckTargets(r, where));
    return r;
  }
  Recipe base;
  if (extends == "auto") {
    if (config == nullptr) {
      return Bad(where, "\"extends\": \"auto\" needs the checkpoint's config.json");
    }
    WD_ASSIGN_OR_RETURN(base, RecipeForArchitectures(config->architectures()));
  } else {
    const auto& files = detail::BuiltinRecipeFiles();
    auto it = std::find_if(files.begin(), files.end(), [&](const detail::EmbeddedRecipe& f) {
      return absl::string_view(f.file) == absl::StrCat(extends, ".json");
    });
    if (it == files.end()) {
      return Bad(where, absl::StrCat("'extends': no built-in recipe '", extends, "'; built-ins: ",
                                     absl::StrJoin(BuiltinRecipeNames(), ", "), ", or \"auto\""));
    }
    WD_ASSIGN_OR_RETURN(
        base, ParseRecipeImpl(it->json, absl::StrCat("built-in ", it->file), config, depth + 1));
  }
  if (r.name.empty()) r.name = absl::StrCat(base.name, "+", label);
  WD_ASSIGN_OR_RETURN(Recipe merged, Merge(base, std::move(r), remove, where));
  WD_RETURN_IF_ERROR(CheckTargets(merged, where));
  return merged;
}

struct Builtins {
  std::vector<Recipe> recipes;
  absl::Status status;
};

const Builtins& GetBuiltins() {
  static const Builtins* b = [] {
    auto* out = new Builtins;
    for (const detail::EmbeddedRecipe& f : detail::BuiltinRecipeFiles()) {
      absl::StatusOr<Recipe> r =
          ParseRecipeImpl(f.json, absl::StrCat("built-in ", f.file), nullptr, 0);
      if (!r.ok()) {
        out->status = r.status();
        continue;
      }
      r->origin = "built-in";
      out->recipes.push_back(*std::move(r));
    }
    return out;
  }();
  return *b;
}

}  // namespace

std::vector<std::string> BuiltinRecipeNames() {
  std::vector<std::string> out;
  for (const Recipe& r : GetBuiltins().recipes) out.push_back(r.name);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> SupportedArchitectures() {
  std::set<std::string> archs;
  for (const Recipe& r : GetBuiltins().recipes)
    archs.insert(r.architectures.begin(), r.architectures.end());
  return {archs.begin(), archs.end()};
}

absl::StatusOr<Recipe> BuiltinRecipe(absl::string_view name) {
  WD_RETURN_IF_ERROR(GetBuiltins().status);
  for (const Recipe& r : GetBuiltins().recipes) {
    if (r.name == name) return r;
  }
  return absl::NotFoundError(absl::StrCat(
      "no built-in recipe '", name, "'; built-ins: ", absl::StrJoin(BuiltinRecipeNames(), ", ")));
}

absl::StatusOr<Recipe> RecipeForArchitectures(const std::vector<std::string>& architectures) {
  WD_RETURN_IF_ERROR(GetBuiltins().status);
  for (const std::string& a : architectures) {
    for (const Recipe& r : GetBuiltins().recipes) {
      if (std::find(r.architectures.begin(), r.architectures.end(), a) != r.architectures.end()) {
        return r;
      }
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unsupported architecture ",
      architectures.empty() ? std::string("(config.json lists no 'architectures')")
                            : absl::StrCat("'", absl::StrJoin(architectures, "', '"), "'"),
      "; supported: ", absl::StrJoin(SupportedArchitectures(), ", "),
      ". Describe it with --recipe FILE (see docs/RECIPES.md), or use the generic Hugging Face "
      "layout with a recipe file that says {\"extends\": \"hf\"}"));
}

absl::StatusOr<Recipe> ParseRecipe(absl::string_view json_text, absl::string_view label,
                                   const ModelConfig* config) {
  return ParseRecipeImpl(json_text, label, config, 0);
}

absl::StatusOr<Recipe> LoadRecipeFile(const std::string& path, const ModelConfig* config) {
  WD_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, 16 << 20));
  return ParseRecipeImpl(text, path, config, 0);
}

}  // namespace weightd
