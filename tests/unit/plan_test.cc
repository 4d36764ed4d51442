// BuildPlan against the worked examples of VLLM_LAYOUT.md (expected numbers come from the
// document, not from the planner), on header-only synthetic checkpoints.
#include "weightd/plan.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "absl/cleanup/cleanup.h"
#include "support/synthetic_checkpoint.h"
#include "weightd/checkpoint.h"

namespace weightd {
namespace {

using testing::LlamaConfig;
using testing::LlamaTensors;
using testing::WriteSyntheticCheckpoint;

class PlanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("wd_plan_test_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  Checkpoint Make(const std::vector<testing::SyntheticTensor>& t, const std::string& cfg,
                  int shards = 3) {
    EXPECT_TRUE(WriteSyntheticCheckpoint(dir_.string(), t, shards, cfg));
    auto c = Checkpoint::Open(dir_.string());
    EXPECT_TRUE(c.ok()) << c.status();
    return *std::move(c);
  }
  // Llama-3-8B with 2 layers (the per-layer numbers are what matter).
  Checkpoint Llama3_8B() {
    return Make(LlamaTensors(4096, 32, 8, 128, 14336, 128256, 2),
                LlamaConfig(4096, 32, 8, 14336, 128256, 2));
  }

  std::filesystem::path dir_;
};

const PlanTarget& Target(const RankPlan& r, const std::string& name) {
  for (const PlanTarget& t : r.targets) {
    if (t.name == name) return t;
  }
  ADD_FAILURE() << "no target " << name;
  static PlanTarget none;
  return none;
}

std::vector<const PlanPiece*> PiecesOf(const Plan& p, const RankPlan& r,
                                       const std::string& target) {
  std::vector<const PlanPiece*> out;
  for (const PlanPiece& pc : r.pieces) {
    if (r.targets[pc.target].name == target) out.push_back(&pc);
  }
  std::sort(out.begin(), out.end(),
            [](const PlanPiece* a, const PlanPiece* b) { return a->dst_start < b->dst_start; });
  return out;
}

TEST_F(PlanTest, Llama3_8BShapesMatchTheLayoutTable) {
  Checkpoint c = Llama3_8B();
  struct Row {
    int tp;
    int64_t qkv, o_in, gate_up, down_in, vocab;
  };
  // VLLM_LAYOUT.md, "Worked example: Llama-3-8B".
  for (const Row& row :
       {Row{1, 6144, 4096, 28672, 14336, 128256}, Row{2, 3072, 2048, 14336, 7168, 64128},
        Row{4, 1536, 1024, 7168, 3584, 32064}, Row{8, 768, 512, 3584, 1792, 16032},
        Row{16, 512, 256, 1792, 896, 8016}}) {
    PlanOptions o;
    o.tp = row.tp;
    auto plan = BuildPlan(c, o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_EQ(plan->ranks.size(), static_cast<size_t>(row.tp));
    for (const RankPlan& r : plan->ranks) {
      EXPECT_EQ(Target(r, "model.layers.1.self_attn.qkv_proj.weight").shape,
                (std::vector<int64_t>{row.qkv, 4096}));
      EXPECT_EQ(Target(r, "model.layers.1.self_attn.o_proj.weight").shape,
                (std::vector<int64_t>{4096, row.o_in}));
      EXPECT_EQ(Target(r, "model.layers.0.mlp.gate_up_proj.weight").shape,
                (std::vector<int64_t>{row.gate_up, 4096}));
      EXPECT_EQ(Target(r, "model.layers.0.mlp.down_proj.weight").shape,
                (std::vector<int64_t>{4096, row.down_in}));
      EXPECT_EQ(Target(r, "model.embed_tokens.weight").shape,
                (std::vector<int64_t>{row.vocab, 4096}));
      EXPECT_EQ(Target(r, "lm_head.weight").shape, (std::vector<int64_t>{row.vocab, 4096}));
      for (const PlanTarget& t : r.targets) EXPECT_EQ(t.offset % 256, 0u) << t.name;
    }
    // Every source byte is read once, whatever T: KV replication and replicated norms included.
    EXPECT_EQ(plan->read_bytes, plan->checkpoint_bytes) << "tp " << row.tp;
  }
}

TEST_F(PlanTest, QkvRowsForTheDocumentedRanks) {
  Checkpoint c = Llama3_8B();
  PlanOptions o;
  o.tp = 8;
  o.rank = 5;
  auto plan = BuildPlan(c, o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->ranks.size(), 1u);
  auto pcs = PiecesOf(*plan, plan->ranks[0], "model.layers.0.self_attn.qkv_proj.weight");
  ASSERT_EQ(pcs.size(), 3u);
  // T=8, r=5: Q rows 2560-3071, K/V rows 640-767.
  EXPECT_EQ(plan->sources[pcs[0]->source].name, "model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(pcs[0]->src_start[1], 2560);
  EXPECT_EQ(pcs[0]->extent[1], 512);
  EXPECT_EQ(plan->sources[pcs[1]->source].name, "model.layers.0.self_attn.k_proj.weight");
  EXPECT_EQ(pcs[1]->src_start[1], 640);
  EXPECT_EQ(pcs[1]->extent[1], 128);
  EXPECT_EQ(pcs[1]->dst_start[1], 512);
  EXPECT_EQ(plan->sources[pcs[2]->source].name, "model.layers.0.self_attn.v_proj.weight");
  EXPECT_EQ(pcs[2]->src_start[1], 640);
  EXPECT_EQ(pcs[2]->dst_start[1], 640);

  // T=16, r=5: Q rows 1280-1535, K/V rows 256-383 (same as rank 4).
  o.tp = 16;
  for (int r : {4, 5}) {
    o.rank = r;
    auto p16 = BuildPlan(c, o);
    ASSERT_TRUE(p16.ok());
    auto q = PiecesOf(*p16, p16->ranks[0], "model.layers.0.self_attn.qkv_proj.weight");
    ASSERT_EQ(q.size(), 3u);
    EXPECT_EQ(q[0]->src_start[1], r * 256);
    EXPECT_EQ(q[1]->src_start[1], 256);
    EXPECT_EQ(q[2]->src_start[1], 256);
  }
}

TEST_F(PlanTest, VocabPaddingExample) {
  // V 32001, T 2 -> Vp 32064, P 16032; rank 1 holds tokens 16032..32000 then 63 zero rows.
  Checkpoint c =
      Make(LlamaTensors(128, 4, 4, 32, 256, 32001, 1), LlamaConfig(128, 4, 4, 256, 32001, 1));
  PlanOptions o;
  o.tp = 2;
  auto plan = BuildPlan(c, o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const RankPlan& r1 = plan->ranks[1];
  const PlanTarget& emb = Target(r1, "model.embed_tokens.weight");
  EXPECT_EQ(emb.shape, (std::vector<int64_t>{16032, 128}));
  auto pcs = PiecesOf(*plan, r1, "model.embed_tokens.weight");
  ASSERT_EQ(pcs.size(), 1u);
  EXPECT_EQ(pcs[0]->src_start[1], 16032);
  EXPECT_EQ(pcs[0]->extent[1], 15969);
  uint64_t zero = 0;
  for (const PlanZeroFill& z : r1.zero_fills) {
    if (r1.targets[z.target].name == "model.embed_tokens.weight") {
      zero += z.nbytes;
      EXPECT_EQ(z.offset, 15969u * 128 * 2);
    }
  }
  EXPECT_EQ(zero, 63u * 128 * 2);
  EXPECT_TRUE(plan->ranks[0].zero_fills.empty());
}

TEST_F(PlanTest, MixtralExpertShapesAndExpertParallel) {
  std::vector<testing::SyntheticTensor> t = LlamaTensors(4096, 32, 8, 128, 14336, 32000, 1);
  // Replace the dense MLP by 8 experts.
  std::erase_if(t, [](const testing::SyntheticTensor& x) {
    return x.name.find(".mlp.") != std::string::npos;
  });
  t.push_back({"model.layers.0.block_sparse_moe.gate.weight", "BF16", {8, 4096}});
  for (int e = 0; e < 8; ++e) {
    const std::string p = "model.layers.0.block_sparse_moe.experts." + std::to_string(e) + ".";
    t.push_back({p + "w1.weight", "BF16", {14336, 4096}});
    t.push_back({p + "w2.weight", "BF16", {4096, 14336}});
    t.push_back({p + "w3.weight", "BF16", {14336, 4096}});
  }
  std::string cfg = LlamaConfig(4096, 32, 8, 14336, 32000, 1, "MixtralForCausalLM");
  cfg.insert(cfg.size() - 1, ", \"num_local_experts\": 8");
  Checkpoint c = Make(t, cfg, 4);
  PlanOptions o;
  o.tp = 2;
  auto plan = BuildPlan(c, o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const RankPlan& r = plan->ranks[1];
  EXPECT_EQ(Target(r, "model.layers.0.block_sparse_moe.experts.w13_weight").shape,
            (std::vector<int64_t>{8, 14336, 4096}));
  EXPECT_EQ(Target(r, "model.layers.0.block_sparse_moe.experts.w2_weight").shape,
            (std::vector<int64_t>{8, 4096, 7168}));
  EXPECT_EQ(Target(r, "model.embed_tokens.weight").shape, (std::vector<int64_t>{16000, 4096}));

  o.tp = 3;  // 8 experts over 3 ranks: 3, 3, 2
  o.expert_parallel = true;
  auto ep = BuildPlan(c, o);
  ASSERT_FALSE(ep.ok());  // 32 heads are not divisible by 3
  EXPECT_NE(ep.status().message().find("num_attention_heads"), std::string::npos);
}

TEST_F(PlanTest, JsonRoundTripIsExactAndDeterministic) {
  Checkpoint c =
      Make(LlamaTensors(256, 8, 2, 32, 512, 1000, 2), LlamaConfig(256, 8, 2, 512, 1000, 2));
  PlanOptions o;
  o.tp = 4;
  o.dtype = DType::kF32;
  auto a = BuildPlan(c, o);
  auto b = BuildPlan(c, o);
  ASSERT_TRUE(a.ok() && b.ok());
  const absl::StatusOr<std::string> ja = PlanToJson(*a);
  ASSERT_TRUE(ja.ok()) << ja.status();
  EXPECT_EQ(ja, PlanToJson(*b));
  auto back = PlanFromJson(*ja);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(PlanToJson(*back), ja);
  EXPECT_FALSE(a->ranks[0].transforms.empty());  // BF16 -> F32 casts are listed
  auto broken = PlanFromJson(R"({"checkpoint": "x"})");
  EXPECT_FALSE(broken.ok());
}

TEST_F(PlanTest, PlanToJsonRefusesAPathThatIsNotUtf8) {
  // A directory name in another encoding (Latin-1 "é") is a valid path but not JSON text.
  const std::filesystem::path parent = dir_;
  absl::Cleanup restore = [&] { dir_ = parent; };  // TearDown removes the parent and all in it
  dir_ /= "mod\xe9le";
  Checkpoint c = Make(LlamaTensors(64, 4, 2, 16, 128, 100, 1), LlamaConfig(64, 4, 2, 128, 100, 1));
  PlanOptions o;
  auto plan = BuildPlan(c, o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  absl::StatusOr<std::string> j = PlanToJson(*plan);
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(j.status().message().find("mod\\xe9le"), std::string::npos) << j.status();
  EXPECT_NE(j.status().message().find("not UTF-8"), std::string::npos) << j.status();
}

TEST_F(PlanTest, PlanFromJsonNamesTheByteOffset) {
  auto bad = PlanFromJson(R"({"checkpoint": x})");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("plan: not valid JSON at byte 15"), std::string::npos)
      << bad.status();
}

// --- hostile recipes and configs: errors that name the rule, field or tensor, never a crash ----

class PlanRobustnessTest : public PlanTest {
 protected:
  std::string WriteRecipe(const std::string& json) {
    const std::string path = (dir_ / "recipe.json").string();
    std::ofstream(path) << json;
    return path;
  }
  // Llama with 1 layer, 4 heads of 16, GQA 2, the given config overrides appended.
  Checkpoint SmallLlama(const std::string& extra_config = "", int64_t nkv = 2) {
    std::string cfg = LlamaConfig(64, 4, nkv, 128, 100, 1);
    if (!extra_config.empty()) cfg.insert(cfg.size() - 1, ", " + extra_config);
    return Make(LlamaTensors(64, 4, nkv, 16, 128, 100, 1), cfg, 1);
  }
  static void ExpectInvalid(const absl::StatusOr<Plan>& p,
                            const std::vector<std::string>& substrings) {
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
    for (const std::string& s : substrings) {
      EXPECT_NE(p.status().message().find(s), std::string::npos)
          << "\"" << s << "\" not in: " << p.status().message();
    }
  }
};

TEST_F(PlanRobustnessTest, QkvTargetWithoutVIsARecipeErrorNotACrash) {
  // The v_proj rule replaced by a replicated one: qkv_proj gets q and k only. BuildPlan used to
  // dereference the missing part (weightctl plan exited 139, a daemon load crashed).
  Checkpoint c = SmallLlama();
  PlanOptions o;
  o.tp = 2;
  o.recipe_file = WriteRecipe(R"({"extends": "llama", "params": [
      {"source": "model.layers.{l}.self_attn.v_proj.weight", "style": "replicated"}]})");
  ExpectInvalid(BuildPlan(c, o),
                {*o.recipe_file, "qkv target", "model.layers.{l}.self_attn.qkv_proj.weight",
                 "no rule for part v"});
}

TEST_F(PlanRobustnessTest, ZeroKeyValueHeadsIsAConfigError) {
  // k_proj/v_proj of shape [0, 64] agree with num_key_value_heads 0; the qkv arithmetic then
  // divided by it.
  Checkpoint c = SmallLlama("", /*nkv=*/0);
  PlanOptions o;
  o.tp = 2;
  ExpectInvalid(BuildPlan(c, o), {"config.json", "num_key_value_heads", "0"});
}

TEST_F(PlanRobustnessTest, NonPositiveHeadCountsAreConfigErrors) {
  // Zero-row q/k/v agree with the shape expressions when a head count or head_dim is 0; the
  // plan then had zero-size attention instead of an error.
  {
    std::string cfg = LlamaConfig(64, 4, 2, 128, 100, 1);
    cfg.insert(cfg.size() - 1, R"(, "head_dim": 0)");
    Checkpoint c = Make(LlamaTensors(64, 4, 2, /*hd=*/0, 128, 100, 1), cfg, 1);
    ExpectInvalid(BuildPlan(c, PlanOptions{}), {"config.json", "'head_dim' is 0", "at least 1",
                                                "model.layers.0.self_attn.qkv_proj.weight"});
  }
  std::filesystem::remove_all(dir_);
  {
    std::string cfg = LlamaConfig(64, /*nh=*/0, 2, 128, 100, 1);
    cfg.insert(cfg.size() - 1, R"(, "head_dim": 16)");
    Checkpoint c = Make(LlamaTensors(64, 0, 2, 16, 128, 100, 1), cfg, 1);
    ExpectInvalid(BuildPlan(c, PlanOptions{}),
                  {"config.json", "'num_attention_heads' is 0", "at least 1"});
  }
}

TEST_F(PlanRobustnessTest, TensorsWithZeroRowsPlanWithoutDividingByZero) {
  ASSERT_TRUE(testing::WriteSyntheticCheckpoint(
      dir_.string(), {{"a", "BF16", {0, 4}}, {"b", "BF16", {0, 8, 2}}, {"c", "F32", {3, 0}}}, 1,
      R"({"architectures": ["X"]})"));
  auto c = Checkpoint::Open(dir_.string());
  ASSERT_TRUE(c.ok()) << c.status();
  PlanOptions o;
  o.tp = 2;
  o.recipe_file = WriteRecipe(R"({"name": "z", "params": [
      {"source": "a", "style": "replicated"}, {"source": "b", "style": "column"},
      {"source": "c", "style": "vocab"}]})");
  auto plan = BuildPlan(*c, o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  for (const RankPlan& r : plan->ranks) {
    EXPECT_EQ(Target(r, "a").shape, (std::vector<int64_t>{0, 4}));
    EXPECT_EQ(Target(r, "b").shape, (std::vector<int64_t>{0, 8, 2}));
    EXPECT_EQ(Target(r, "c").shape, (std::vector<int64_t>{32, 0}));
    for (const PlanTarget& t : r.targets) EXPECT_EQ(t.nbytes, 0u) << t.name;
  }
  // What the planner produced is a plan its own checker accepts.
  absl::StatusOr<std::string> j = PlanToJson(*plan);
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_TRUE(PlanFromJson(*j).ok()) << PlanFromJson(*j).status();
}

TEST_F(PlanRobustnessTest, RenamesCannotGrowANameWithoutBound) {
  // Each rule quadruples every "l" of the name: 4^20 times longer after twenty of them.
  std::string renames;
  for (int i = 0; i < 20; ++i) {
    absl::StrAppend(&renames, i ? "," : "", R"({"substring": "l", "to": "llll"})");
  }
  Checkpoint c = SmallLlama();
  PlanOptions o;
  o.recipe_file = WriteRecipe(absl::StrCat(R"({"extends": "llama", "rename": [)", renames, "]}"));
  ExpectInvalid(BuildPlan(c, o), {"renaming tensor", "longer than 65536 bytes", "rename["});
}

TEST_F(PlanRobustnessTest, ShapeExpressionOverflowIsAnError) {
  Checkpoint c = SmallLlama();
  PlanOptions o;
  o.recipe_file = WriteRecipe(R"({"extends": "llama", "params": [
      {"source": "model.norm.weight", "style": "replicated",
       "shape": ["4611686018427387904*hidden_size"]}]})");
  ExpectInvalid(BuildPlan(c, o), {"overflows", "4611686018427387904*hidden_size", "params[0]"});
}

std::vector<testing::SyntheticTensor> MoeTensors(int experts, const std::string& index = "") {
  std::vector<testing::SyntheticTensor> t = LlamaTensors(64, 4, 2, 16, 128, 100, 1);
  std::erase_if(t, [](const testing::SyntheticTensor& x) {
    return x.name.find(".mlp.") != std::string::npos;
  });
  t.push_back({"model.layers.0.block_sparse_moe.gate.weight", "BF16", {experts, 64}});
  for (int e = 0; e < experts; ++e) {
    const std::string p = "model.layers.0.block_sparse_moe.experts." +
                          (index.empty() || e > 0 ? std::to_string(e) : index) + ".";
    t.push_back({p + "w1.weight", "BF16", {32, 64}});
    t.push_back({p + "w2.weight", "BF16", {64, 32}});
    t.push_back({p + "w3.weight", "BF16", {32, 64}});
  }
  return t;
}

std::string MoeConfig(const std::string& experts) {
  std::string cfg = LlamaConfig(64, 4, 2, 32, 100, 1, "MixtralForCausalLM");
  cfg.insert(cfg.size() - 1, ", \"num_local_experts\": " + experts);
  return cfg;
}

TEST_F(PlanRobustnessTest, ExpertsBeyondNumExpertsAreAnErrorNotDropped) {
  // Three experts in the checkpoint, two in config.json: expert 2 was silently left out.
  std::vector<testing::SyntheticTensor> t = MoeTensors(3);
  for (auto& x : t) {
    if (x.name == "model.layers.0.block_sparse_moe.gate.weight") x.shape = {2, 64};
  }
  Checkpoint c = Make(t, MoeConfig("2"), 2);
  PlanOptions o;
  o.tp = 2;
  ExpectInvalid(BuildPlan(c, o),
                {"model.layers.0.block_sparse_moe.experts.2.w", "expert 2", "num_experts is 2"});
  o.expert_parallel = true;
  ExpectInvalid(BuildPlan(c, o), {"expert 2", "num_experts is 2"});
}

TEST_F(PlanRobustnessTest, NonPositiveExpertCountIsAConfigError) {
  std::vector<testing::SyntheticTensor> t = MoeTensors(1);
  for (auto& x : t) {
    if (x.name == "model.layers.0.block_sparse_moe.gate.weight") x.shape = {0, 64};
  }
  Checkpoint c = Make(t, MoeConfig("0"), 1);
  PlanOptions o;
  ExpectInvalid(BuildPlan(c, o), {"num_experts", "0"});
}

TEST_F(PlanRobustnessTest, ExpertIndexBeyond64BitsIsAnError) {
  Checkpoint c = Make(MoeTensors(1, "99999999999999999999"), MoeConfig("1"), 1);
  PlanOptions o;
  ExpectInvalid(BuildPlan(c, o), {"99999999999999999999", "expert index"});
}

TEST_F(PlanTest, PlanFromJsonRefusesSizesThatOnlyAgreeByOverflow) {
  // 2^32 x 2^32 elements wrap to 0 in 64 bits, which "agreed" with nbytes 0.
  const std::string head =
      R"({"checkpoint": "c", "recipe": "r", "architecture": "", "tp": 1, "expert_parallel": false,
          "checkpoint_bytes": 0, "read_bytes": 0,
          "files": [{"path": "f", "file_size": 8, "read_bytes": 0}],)";
  auto wrapped = PlanFromJson(head + R"("sources": [{"name": "w", "dtype": "U8",
      "shape": [4294967296, 4294967296], "file": 0, "offset": 8, "nbytes": 0}], "ranks": []})");
  ASSERT_FALSE(wrapped.ok());
  EXPECT_NE(wrapped.status().message().find("sources[0] 'w': shape and dtype disagree"),
            std::string::npos)
      << wrapped.status();
  // A zero fill whose end wraps past 2^64 lies outside its target.
  auto fill = PlanFromJson(head + R"("sources": [], "ranks": [{"rank": 0, "arena_bytes": 256,
      "targets": [{"name": "t", "dtype": "U8", "shape": [4], "offset": 0, "nbytes": 4,
                   "style": "replicated"}], "pieces": [],
      "zero_fills": [{"target": 0, "offset": 2, "nbytes": 18446744073709551615}],
      "transforms": []}]})");
  ASSERT_FALSE(fill.ok());
  EXPECT_NE(fill.status().message().find("zero fill outside its target"), std::string::npos)
      << fill.status();
}

TEST_F(PlanTest, OptionErrors) {
  Checkpoint c = Make(LlamaTensors(64, 4, 2, 16, 128, 100, 1), LlamaConfig(64, 4, 2, 128, 100, 1));
  PlanOptions o;
  o.tp = 2;
  o.rank = 2;
  auto p = BuildPlan(c, o);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("--rank 2"), std::string::npos);
  o.rank.reset();
  o.dtype = DType::kI32;
  EXPECT_FALSE(BuildPlan(c, o).ok());
}

}  // namespace
}  // namespace weightd
