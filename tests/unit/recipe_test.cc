// Recipes: name patterns, built-ins, user files (including the docs' worked example), errors.
#include "weightd/recipe.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <future>
#include <random>
#include <sstream>
#include <tuple>

#include "test_util.h"

namespace weightd {
namespace {

TEST(NamePatternTest, CapturesDigitsAndAnyText) {
  auto p = NamePattern::Parse("model.layers.{l}.mlp.experts.{e}.w1.weight", "t");
  ASSERT_TRUE(p.ok()) << p.status();
  NamePattern::Captures c;
  ASSERT_TRUE(p->Match("model.layers.12.mlp.experts.7.w1.weight", &c));
  EXPECT_EQ(*c.Get("l"), "12");
  EXPECT_EQ(*c.Get("e"), "7");
  EXPECT_FALSE(p->Match("model.layers.x.mlp.experts.7.w1.weight", &c));
  EXPECT_FALSE(p->Match("model.layers.1.mlp.experts.7.w1.weight.extra", &c));
  EXPECT_FALSE(p->Match("model.layers..mlp.experts.7.w1.weight", &c));

  auto any = NamePattern::Parse("{*}.bias", "t");
  ASSERT_TRUE(any.ok());
  ASSERT_TRUE(any->Match("a.b.c.bias", &c));
  EXPECT_EQ(*c.Get("*"), "a.b.c");
  auto t = NamePattern::Parse("x.{l}.y", "t");
  c.vars = {{"l", "3"}};
  EXPECT_EQ(t->Expand(c), "x.3.y");
}

TEST(NamePatternTest, RejectsMalformedPatterns) {
  auto a = NamePattern::Parse("a.{l", "file.json: params[2]");
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.status().message().find("params[2]"), std::string::npos);
  EXPECT_FALSE(NamePattern::Parse("a.{l}{e}", "x").ok());
  EXPECT_FALSE(NamePattern::Parse("a.{}", "x").ok());
}

TEST(NamePatternTest, ManyPlaceholdersOverALongNameMatchInLinearTime) {
  // Backtracking alone tried every split of the 1s among six digit placeholders before failing
  // on the missing '2': days for this name (a recipe could hang a planner or a daemon load).
  auto p = NamePattern::Parse("{a}1{b}1{c}1{d}1{e}1{f}2{g}x", "t");
  ASSERT_TRUE(p.ok()) << p.status();
  const std::string ones(3000, '1');
  auto run = std::async(std::launch::async, [&] {
    NamePattern::Captures no, yes;
    const bool miss = p->Match(ones + "x", &no);
    const bool hit = p->Match(ones + "25x", &yes);
    return std::make_tuple(miss, hit, yes);
  });
  if (run.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
    ADD_FAILURE() << "Match did not return within 20 s";
    std::_Exit(1);  // the match cannot be interrupted
  }
  const auto [miss, hit, caps] = run.get();
  EXPECT_FALSE(miss);
  ASSERT_TRUE(hit);
  // The split backtracking would choose: {a} the longest run that leaves the rest matchable.
  EXPECT_EQ(*caps.Get("a"), std::string(2990, '1'));
  for (const char* v : {"b", "c", "d", "e", "f"}) EXPECT_EQ(*caps.Get(v), "1") << v;
  EXPECT_EQ(*caps.Get("g"), "5");
}

// A plain backtracking matcher with NamePattern's order of preference, for small inputs.
bool ReferenceMatch(const std::vector<std::pair<bool, std::string>>& segs, size_t s,
                    const std::string& rest, std::vector<std::string>* caps) {
  if (s == segs.size()) return rest.empty();
  if (!segs[s].first) {
    return rest.compare(0, segs[s].second.size(), segs[s].second) == 0 &&
           ReferenceMatch(segs, s + 1, rest.substr(segs[s].second.size()), caps);
  }
  std::vector<size_t> lens;
  if (segs[s].second == "*") {
    for (size_t k = 0; k <= rest.size(); ++k) lens.push_back(k);
  } else {
    size_t run = 0;
    while (run < rest.size() && rest[run] >= '0' && rest[run] <= '9') ++run;
    for (size_t k = run; k >= 1; --k) lens.push_back(k);
  }
  for (size_t len : lens) {
    caps->push_back(rest.substr(0, len));
    if (ReferenceMatch(segs, s + 1, rest.substr(len), caps)) return true;
    caps->pop_back();
  }
  return false;
}

TEST(NamePatternTest, LongSearchesGiveTheSameCapturesAsBacktracking) {
  // Names mostly of 1s against several digit placeholders: a tenth of these searches run past
  // Match's step budget and are decided by table; the reference backtracks to the end. Same
  // answer and the same split, for every input.
  std::mt19937 rng(12345);
  const char* literals[] = {"1", "2", "x", "1", "21"};
  const char* vars[] = {"a", "b", "*", "c", "e"};
  int matched = 0;
  for (int iter = 0; iter < 300; ++iter) {
    std::string text;
    std::vector<std::pair<bool, std::string>> segs;
    const int nvars = 3 + static_cast<int>(rng() % 3);
    int stars = 0;
    for (int v = 0; v < nvars; ++v) {
      const std::string lit = literals[rng() % 5];
      std::string var = vars[rng() % 5];
      if (var == "*" && stars++ > 0) var = "d" + std::to_string(v);  // sources bind once
      if (var != "*" && text.find("{" + var + "}") != std::string::npos) var += std::to_string(v);
      if (v > 0 || rng() % 2) {
        text += lit;
        segs.push_back({false, lit});
      }
      text += "{" + var + "}";
      segs.push_back({true, var});
    }
    const std::string tail = literals[rng() % 5];
    text += tail;
    segs.push_back({false, tail});
    std::string name;
    const size_t len = 30 + rng() % 40;
    for (size_t i = 0; i < len; ++i) name += "1111111112x"[rng() % 11];
    name += tail;
    auto p = NamePattern::Parse(text, "t");
    ASSERT_TRUE(p.ok()) << text << ": " << p.status();
    NamePattern::Captures caps;
    std::vector<std::string> want;
    const bool got = p->Match(name, &caps);
    ASSERT_EQ(got, ReferenceMatch(segs, 0, name, &want)) << text << " vs " << name;
    if (!got) continue;
    ++matched;
    ASSERT_EQ(caps.vars.size(), want.size()) << text << " vs " << name;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(caps.vars[i].second, want[i]) << text << " vs " << name << ", placeholder " << i;
    }
  }
  EXPECT_GT(matched, 10);  // the inputs match often enough to compare splits
}

TEST(NamePatternTest, AtMostSixteenPlaceholders) {
  std::string text;
  for (int i = 0; i < 17; ++i) text += "{v" + std::to_string(i) + "}.";
  auto p = NamePattern::Parse(text, "r.json: params[4]");
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("r.json: params[4]"), std::string::npos);
  EXPECT_NE(p.status().message().find("more than 16 placeholders"), std::string::npos);
  EXPECT_TRUE(NamePattern::Parse(text.substr(text.find('.') + 1), "t").ok());
}

TEST(RecipeTest, BuiltinsParseAndCoverTheIssueArchitectures) {
  std::vector<std::string> names = BuiltinRecipeNames();
  EXPECT_EQ(names,
            (std::vector<std::string>{"hf", "llama", "mixtral", "qwen2", "qwen3", "qwen3_moe"}));
  for (const char* arch : {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM"}) {
    auto r = RecipeForArchitectures({arch});
    ASSERT_TRUE(r.ok()) << arch << ": " << r.status();
  }
  EXPECT_EQ(RecipeForArchitectures({"MistralForCausalLM"})->name, "llama");
  EXPECT_EQ(RecipeForArchitectures({"Qwen3MoeForCausalLM"})->name, "qwen3_moe");
}

TEST(RecipeTest, ExtendsOverridesAndInherits) {
  // qwen2 replaces llama's optional bias rules by required ones and keeps everything else.
  auto q2 = BuiltinRecipe("qwen2");
  ASSERT_TRUE(q2.ok()) << q2.status();
  int bias_rules = 0, o_proj = 0;
  for (const ParamRule& r : q2->params) {
    if (r.source.text().find("_proj.bias") != std::string::npos && r.style == ParallelStyle::kQkv) {
      ++bias_rules;
      EXPECT_TRUE(r.required) << r.source.text();
    }
    if (r.source.text() == "model.layers.{l}.self_attn.o_proj.weight") ++o_proj;
  }
  EXPECT_EQ(bias_rules, 3);
  EXPECT_EQ(o_proj, 1);
  auto mix = BuiltinRecipe("mixtral");
  for (const ParamRule& r : mix->params) {
    EXPECT_EQ(r.source.text().find("mlp.gate_proj"), std::string::npos)
        << "removed by remove_params";
  }
}

TEST(RecipeTest, UnsupportedArchitectureListsSupportedAndPointsToRecipe) {
  auto r = RecipeForArchitectures({"FooForCausalLM"});
  ASSERT_FALSE(r.ok());
  const std::string m(r.status().message());
  EXPECT_NE(m.find("FooForCausalLM"), std::string::npos);
  EXPECT_NE(m.find("Qwen2ForCausalLM"), std::string::npos);
  EXPECT_NE(m.find("--recipe"), std::string::npos);
}

TEST(RecipeTest, LoadsTheDocsWorkedExample) {
  const std::string path = std::string(WEIGHTD_SOURCE_DIR) + "/docs/examples/recipe-example.json";
  auto r = LoadRecipeFile(path, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->name, "wren");
  EXPECT_EQ(r->architectures, std::vector<std::string>{"WrenForCausalLM"});
  EXPECT_EQ(r->layers_field, "wren_layers");
  ASSERT_EQ(r->renames.size(), 2u);
  EXPECT_EQ(r->renames[0].kind, RenameRule::Kind::kPrefix);
  EXPECT_EQ(r->params.size(), 12u);
  NamePattern::Captures c;
  const ParamRule* wk = nullptr;
  for (const ParamRule& p : r->params) {
    if (p.source.Match("layers.3.attn.wk", &c)) wk = &p;
  }
  ASSERT_NE(wk, nullptr);
  EXPECT_EQ(wk->style, ParallelStyle::kQkv);
  EXPECT_EQ(wk->shard, 1);
  EXPECT_EQ(wk->target.Expand(c), "model.layers.3.self_attn.qkv_proj.weight");
}

TEST(RecipeTest, ErrorsNameTheFileAndRule) {
  auto bad_style = ParseRecipe(
      R"({"name": "x", "params": [{"source": "a", "style": "replicated"}, {"source": "b", "style": "diag"}]})",
      "my.json", nullptr);
  ASSERT_FALSE(bad_style.ok());
  EXPECT_NE(bad_style.status().message().find("my.json: params[1]"), std::string::npos);
  EXPECT_NE(bad_style.status().message().find("diag"), std::string::npos);

  auto bad_key =
      ParseRecipe(R"({"name": "x", "rename": [{"prefix": "a", "too": "b"}]})", "k.json", nullptr);
  ASSERT_FALSE(bad_key.ok());
  EXPECT_NE(bad_key.status().message().find("k.json: rename[0]"), std::string::npos);
  EXPECT_NE(bad_key.status().message().find("too"), std::string::npos);

  auto bad_base = ParseRecipe(R"({"extends": "gpt7"})", "e.json", nullptr);
  ASSERT_FALSE(bad_base.ok());
  EXPECT_NE(bad_base.status().message().find("gpt7"), std::string::npos);
  EXPECT_NE(bad_base.status().message().find("llama"), std::string::npos);

  auto moe = ParseRecipe(R"({"name": "m", "params": [{"source": "x.{l}.w", "style": "moe_w2"}]})",
                         "m.json", nullptr);
  ASSERT_FALSE(moe.ok());
  EXPECT_NE(moe.status().message().find("{e}"), std::string::npos);

  EXPECT_FALSE(ParseRecipe("{not json", "j.json", nullptr).ok());
}

TEST(RecipeTest, JsonErrorsNameTheFileAndByteOffset) {
  auto utf8 = ParseRecipe("{\"name\": \"x\xff\"}", "r.json", nullptr);
  ASSERT_FALSE(utf8.ok());
  EXPECT_EQ(utf8.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(utf8.status().message().find("r.json: not valid JSON at byte 11"), std::string::npos)
      << utf8.status();
  auto syntax = ParseRecipe("{\"name\": \"x\", // a comment\n \"params\": [,]}", "s.json", nullptr);
  ASSERT_FALSE(syntax.ok());
  EXPECT_NE(syntax.status().message().find("s.json: not valid JSON at byte 39"), std::string::npos)
      << syntax.status();
  // Above int64: refused, not wrapped to a negative default.
  auto big = ParseRecipe(R"({"name": "x", "config_defaults": {"n": 18446744073709551615}})",
                         "b.json", nullptr);
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("b.json: config_defaults.n must be a 64-bit integer"),
            std::string::npos)
      << big.status();
}

// --- validation: every rule and field, and the fused targets across rules ----------------------

using ::weightd::testing::StatusIs;
using ::weightd::testing::Subs;

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
constexpr char kQ[] =
    R"({"source": "layers.{l}.wq", "target": "layers.{l}.qkv", "style": "qkv", "shard": "q"})";
constexpr char kK[] =
    R"({"source": "layers.{l}.wk", "target": "layers.{l}.qkv", "style": "qkv", "shard": "k"})";
constexpr char kV[] =
    R"({"source": "layers.{l}.wv", "target": "layers.{l}.qkv", "style": "qkv", "shard": "v"})";

absl::StatusOr<Recipe> Params(const std::vector<std::string>& rules) {
  return ParseRecipe(absl::StrCat(R"({"name": "t", "params": [)", absl::StrJoin(rules, ","), "]}"),
                     "r.json", nullptr);
}

TEST(RecipeValidationTest, QkvTargetWithoutOneOfItsPartsIsRejected) {
  EXPECT_THAT(
      Params({kQ, kK}),
      StatusIs(kInvalid, Subs({"r.json: qkv target 'layers.{l}.qkv' has no rule for part v",
                               "r.json: params[0] (part q)", "r.json: params[1] (part k)"})));
  EXPECT_THAT(Params({kV, kK}),
              StatusIs(kInvalid, Subs({"r.json: qkv target 'layers.{l}.qkv'", "part q"})));
  ASSERT_TRUE(Params({kQ, kK, kV}).ok());
  // An alternative source for one part is fine.
  ASSERT_TRUE(Params({kQ, kK, kV,
                      R"({"source": "layers.{l}.q_proj", "target": "layers.{l}.qkv",
                          "style": "qkv", "shard": "q"})"})
                  .ok());
}

TEST(RecipeValidationTest, ExtendingCannotLeaveABuiltinFusedTargetIncomplete) {
  // Replacing llama's v_proj rule (same source) by a replicated one leaves qkv_proj without v.
  EXPECT_THAT(ParseRecipe(R"({"extends": "llama", "params": [
                  {"source": "model.layers.{l}.self_attn.v_proj.weight", "style": "replicated"}]})",
                          "mine.json", nullptr),
              StatusIs(kInvalid, Subs({"mine.json: qkv target "
                                       "'model.layers.{l}.self_attn.qkv_proj.weight' has no rule "
                                       "for part v",
                                       "built-in llama.json: params[5] (part q)"})));
  EXPECT_THAT(ParseRecipe(R"({"extends": "llama",
                              "remove_params": ["model.layers.{l}.mlp.gate_proj.weight"]})",
                          "rm.json", nullptr),
              StatusIs(kInvalid, Subs({"rm.json: merged_column target "
                                       "'model.layers.{l}.mlp.gate_up_proj.weight' has no rule "
                                       "for part 0"})));
  EXPECT_THAT(ParseRecipe(R"({"extends": "llama", "remove_params": ["model.layers.{l}.nope"]})",
                          "rm.json", nullptr),
              StatusIs(kInvalid, Subs({"rm.json: remove_params[0] 'model.layers.{l}.nope'",
                                       "recipe 'llama'"})));
}

TEST(RecipeValidationTest, MoeAndMergedColumnParts) {
  const std::string gate =
      R"({"source": "e.{e}.w1", "target": "w13", "style": "moe_w13", "shard": 0})";
  EXPECT_THAT(
      Params({gate}),
      StatusIs(kInvalid, Subs({"r.json: moe_w13 target 'w13' has no rule for part 1 (up)"})));
  EXPECT_THAT(
      Params({gate, R"({"source": "e.{e}.w3", "target": "w13", "style": "moe_w13",
                                "shard": 2})"}),
      StatusIs(kInvalid, Subs({"r.json: params[1]", "'shard' must be 0 (gate) or 1 (up)"})));
  ASSERT_TRUE(
      Params({gate, R"({"source": "e.{e}.w3", "target": "w13", "style": "moe_w13", "shard": 1})"})
          .ok());
  EXPECT_THAT(
      Params({R"({"source": "a", "target": "m", "style": "merged_column", "shard": 0})",
              R"({"source": "b", "target": "m", "style": "merged_column", "shard": 2})"}),
      StatusIs(kInvalid, Subs({"r.json: merged_column target 'm' has no rule for part 1"})));
  EXPECT_THAT(Params({R"({"source": "a", "target": "m", "style": "merged_column", "shard": "k"})"}),
              StatusIs(kInvalid, Subs({"r.json: params[0]", "[0, 64)"})));
}

TEST(RecipeValidationTest, ShardIsRequiredForFusedStylesAndRefusedForOthers) {
  EXPECT_THAT(Params({R"({"source": "a", "target": "t", "style": "qkv"})"}),
              StatusIs(kInvalid, Subs({"r.json: params[0]", "a qkv rule needs 'shard'"})));
  EXPECT_THAT(Params({R"({"source": "a", "style": "replicated", "shard": 1})"}),
              StatusIs(kInvalid, Subs({"r.json: params[0]", "'shard' applies to qkv"})));
  EXPECT_THAT(Params({R"({"source": "a", "target": "t", "style": "qkv", "shard": 3})"}),
              StatusIs(kInvalid, Subs({"r.json: params[0]", "\"q\", \"k\" or \"v\""})));
}

TEST(RecipeValidationTest, OneTargetHasOneStyle) {
  EXPECT_THAT(Params({kQ, kK, kV, R"({"source": "layers.{l}.x", "target": "layers.{l}.qkv",
                                       "style": "column"})"}),
              StatusIs(kInvalid, Subs({"r.json: target 'layers.{l}.qkv' gets style qkv from "
                                       "r.json: params[0] but column from r.json: params[3]"})));
}

TEST(RecipeValidationTest, PlaceholdersOfTheTargetMustBeCapturedByTheSource) {
  EXPECT_THAT(Params({R"({"source": "a.{l}.w", "target": "b.{l}.{x}", "style": "replicated"})"}),
              StatusIs(kInvalid, Subs({"r.json: params[0]", "uses {x}", "'a.{l}.w'"})));
  EXPECT_THAT(Params({R"({"source": "a.{l}.b.{l}", "style": "replicated"})"}),
              StatusIs(kInvalid, Subs({"r.json: params[0]", "{l} twice"})));
}

TEST(RecipeValidationTest, ShapeExpressionsAreProductsOfIntegersAndFields) {
  for (const char* bad :
       {"hidden_size**2", "", "hidden size", "-4", "a+b", "99999999999999999999"}) {
    EXPECT_THAT(Params({absl::StrCat(R"({"source": "a", "style": "replicated", "shape": ["8", ")",
                                     bad, R"("]})")}),
                StatusIs(kInvalid, Subs({"r.json: params[0]", "shape[1]"})))
        << bad;
  }
  ASSERT_TRUE(Params({R"({"source": "a", "style": "replicated",
                           "shape": ["2 * num_attention_heads*head_dim", "_x1"]})"})
                  .ok());
}

TEST(RecipeValidationTest, EmptySkipAndLayersField) {
  EXPECT_THAT(ParseRecipe(R"({"name": "t", "skip": ["a", ""]})", "r.json", nullptr),
              StatusIs(kInvalid, Subs({"r.json: skip[1] is empty"})));
  EXPECT_THAT(ParseRecipe(R"({"name": "t", "layers_field": ""})", "r.json", nullptr),
              StatusIs(kInvalid, Subs({"r.json: 'layers_field'"})));
}

}  // namespace
}  // namespace weightd
