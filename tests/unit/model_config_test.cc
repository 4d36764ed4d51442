// Tests of ModelConfig: the config.json fields the planner reads and their Hugging Face defaults.
#include "weightd/model_config.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace weightd {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::weightd::testing::StatusIs;
using ::weightd::testing::Subs;
using ::weightd::testing::TempDir;

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
constexpr char kLabel[] = "/models/llama/config.json";

ModelConfig MustParse(const std::string& json) {
  absl::StatusOr<ModelConfig> c = ModelConfig::Parse(json, kLabel);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : ModelConfig();
}

TEST(ModelConfigTest, ReadsFields) {
  const ModelConfig c = MustParse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
    "vocab_size": 128256, "num_hidden_layers": 32, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16", "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0}})");
  EXPECT_EQ(c.label(), kLabel);
  EXPECT_THAT(c.architectures(), ElementsAre("LlamaForCausalLM"));
  EXPECT_EQ(c.model_type(), "llama");
  EXPECT_EQ(c.hidden_size(), 4096);
  EXPECT_EQ(c.num_attention_heads(), 32);
  EXPECT_EQ(c.num_key_value_heads(), 8);
  EXPECT_EQ(c.intermediate_size(), 14336);
  EXPECT_EQ(c.vocab_size(), 128256);
  EXPECT_EQ(c.num_hidden_layers(), 32);
  EXPECT_FALSE(c.tie_word_embeddings());
  EXPECT_EQ(c.torch_dtype(), "bfloat16");
  // Integral floats count as integers; fractional ones are not integers.
  EXPECT_EQ(c.GetInt("rope_theta"), 500000);
  EXPECT_EQ(c.GetInt("rms_norm_eps"), std::nullopt);
  EXPECT_EQ(c.GetBool("tie_word_embeddings"), false);
  EXPECT_EQ(c.GetString("model_type"), "llama");
  EXPECT_EQ(c.GetInt("model_type"), std::nullopt);
  EXPECT_EQ(c.GetInt("rope_scaling"), std::nullopt);
  EXPECT_EQ(c.num_experts(), std::nullopt);
  EXPECT_EQ(c.moe_intermediate_size(), std::nullopt);
}

TEST(ModelConfigTest, Defaults) {
  const ModelConfig c = MustParse(R"({"hidden_size": 4096, "num_attention_heads": 32})");
  EXPECT_THAT(c.architectures(), IsEmpty());
  EXPECT_EQ(c.model_type(), "");
  EXPECT_EQ(c.num_key_value_heads(), 32);
  EXPECT_EQ(c.HeadDim(), 128);
  EXPECT_TRUE(c.tie_word_embeddings());
  EXPECT_EQ(c.torch_dtype(), std::nullopt);
}

TEST(ModelConfigTest, HeadDimExplicitWins) {
  // Gemma-style: head_dim is not hidden_size / heads.
  const ModelConfig c =
      MustParse(R"({"hidden_size": 3072, "num_attention_heads": 16, "head_dim": 256})");
  EXPECT_EQ(c.HeadDim(), 256);
}

TEST(ModelConfigTest, HeadDimUnknownWithoutInputs) {
  EXPECT_EQ(MustParse(R"({"hidden_size": 4096})").HeadDim(), std::nullopt);
  EXPECT_EQ(MustParse(R"({"num_attention_heads": 32})").HeadDim(), std::nullopt);
  EXPECT_EQ(MustParse(R"({"hidden_size": 4096, "num_attention_heads": 0})").HeadDim(),
            std::nullopt);
  EXPECT_EQ(MustParse(R"({})").num_key_value_heads(), std::nullopt);
}

TEST(ModelConfigTest, NumExperts) {
  EXPECT_EQ(MustParse(R"({"num_local_experts": 8})").num_experts(), 8);
  EXPECT_EQ(MustParse(R"({"num_experts": 60})").num_experts(), 60);
  EXPECT_EQ(MustParse(R"({"num_local_experts": 8, "num_experts": 60})").num_experts(), 8);
}

TEST(ModelConfigTest, DtypeNewSpelling) {
  EXPECT_EQ(MustParse(R"({"dtype": "float16"})").torch_dtype(), "float16");
  EXPECT_EQ(MustParse(R"({"dtype": "float16", "torch_dtype": "bfloat16"})").torch_dtype(),
            "bfloat16");
}

TEST(ModelConfigTest, TextConfigFallback) {
  const ModelConfig c = MustParse(R"({
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
    "vocab_size": 32064,
    "text_config": {"hidden_size": 4096, "num_attention_heads": 32, "vocab_size": 1,
                    "model_type": "llama", "tie_word_embeddings": false}})");
  EXPECT_EQ(c.hidden_size(), 4096);
  EXPECT_EQ(c.HeadDim(), 128);
  // The top level wins where both have the field.
  EXPECT_EQ(c.vocab_size(), 32064);
  EXPECT_EQ(c.model_type(), "llava");
  EXPECT_FALSE(c.tie_word_embeddings());
}

TEST(ModelConfigTest, RequireIntNamesFileFieldAndPurpose) {
  const ModelConfig c = MustParse(R"({"hidden_size": 4096, "model_type": "llama"})");
  EXPECT_EQ(c.RequireInt("hidden_size", "qkv sharding").value_or(-1), 4096);
  EXPECT_THAT(c.RequireInt("num_attention_heads", "qkv sharding"),
              StatusIs(kInvalid, Subs({kLabel, "'num_attention_heads'", "qkv sharding"})));
  // A string is not an integer.
  EXPECT_THAT(c.RequireInt("model_type", "expert placement"),
              StatusIs(kInvalid, Subs({kLabel, "'model_type'", "expert placement"})));
}

TEST(ModelConfigTest, InvalidJson) {
  EXPECT_THAT(ModelConfig::Parse("{\"hidden_size\": 4096,", kLabel),
              StatusIs(kInvalid, Subs({kLabel, "not valid JSON"})));
  EXPECT_THAT(ModelConfig::Parse("", kLabel), StatusIs(kInvalid, Subs({kLabel, "not valid JSON"})));
  EXPECT_THAT(ModelConfig::Parse("[1, 2]", kLabel),
              StatusIs(kInvalid, Subs({kLabel, "not a JSON object"})));
  EXPECT_THAT(ModelConfig::Parse(R"({"architectures": "LlamaForCausalLM"})", kLabel),
              StatusIs(kInvalid, Subs({kLabel, "'architectures'"})));
  EXPECT_THAT(ModelConfig::Parse(R"({"architectures": [1]})", kLabel),
              StatusIs(kInvalid, Subs({kLabel, "'architectures'"})));
}

TEST(ModelConfigTest, InvalidJsonNamesTheByteOffset) {
  EXPECT_THAT(ModelConfig::Parse(R"({"hidden_size": 40x6})", kLabel),
              StatusIs(kInvalid, Subs({kLabel, "not valid JSON at byte 18"})));
  // A string that is not UTF-8: the error points at the bad byte and does not quote it raw.
  absl::StatusOr<ModelConfig> bad = ModelConfig::Parse("{\"model_type\": \"ll\xff\"}", kLabel);
  EXPECT_THAT(bad, StatusIs(kInvalid, Subs({kLabel, "not valid JSON at byte 18", "UTF-8"})));
  EXPECT_EQ(bad.status().message().find('\xff'), std::string::npos) << bad.status();
}

TEST(ModelConfigTest, NumbersOutsideInt64AreNotIntegers) {
  const ModelConfig c = MustParse(R"({"a": 1e300, "b": -1e300, "c": 18446744073709551615,
    "d": 9223372036854775807, "e": 9223372036854775808.0, "f": -9223372036854775808.0,
    "g": -9223372036854775808})");
  EXPECT_EQ(c.GetInt("a"), std::nullopt);
  EXPECT_EQ(c.GetInt("b"), std::nullopt);
  EXPECT_EQ(c.GetInt("c"), std::nullopt);  // not wrapped to -1
  EXPECT_EQ(c.GetInt("d"), INT64_MAX);
  EXPECT_EQ(c.GetInt("e"), std::nullopt);
  EXPECT_EQ(c.GetInt("f"), INT64_MIN);
  EXPECT_EQ(c.GetInt("g"), INT64_MIN);
}

TEST(ModelConfigTest, LoadFromFile) {
  TempDir dir;
  const std::string path = dir.Write("config.json", R"({"hidden_size": 8})");
  absl::StatusOr<ModelConfig> c = ModelConfig::Load(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->label(), path);
  EXPECT_EQ(c->hidden_size(), 8);
  EXPECT_THAT(ModelConfig::Load(dir.Path("absent.json")),
              StatusIs(absl::StatusCode::kNotFound, Subs({"absent.json"})));
}

}  // namespace
}  // namespace weightd
