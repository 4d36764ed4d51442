// Recipes: name patterns, built-ins, user files (including the docs' worked example), errors.
#include "weightd/recipe.h"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

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

}  // namespace
}  // namespace weightd
