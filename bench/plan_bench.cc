// Planning time for a Llama-3-70B-shaped checkpoint at T=8.
//
// Method: 80 layers (H 8192, nH 64, nKV 8, I 28672, V 128256), 30 shards with real safetensors
// headers and sparse data (ftruncate), written once to a temp dir. The checkpoint is opened once
// (header parsing is header_parse_bench's subject); each iteration times BuildPlan for all 8
// ranks, and separately PlanToJson. Target (issue 3): BuildPlan < 50 ms.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <filesystem>

#include "support/synthetic_checkpoint.h"
#include "weightd/checkpoint.h"
#include "weightd/plan.h"

namespace {

const weightd::Checkpoint& Llama70B() {
  static const weightd::Checkpoint* ckpt = [] {
    const std::string dir =
        (std::filesystem::temp_directory_path() / ("wd_plan_bench_70b_" + std::to_string(getpid())))
            .string();
    weightd::testing::WriteSyntheticCheckpoint(
        dir, weightd::testing::LlamaTensors(8192, 64, 8, 128, 28672, 128256, 80), 30,
        weightd::testing::LlamaConfig(8192, 64, 8, 28672, 128256, 80));
    auto c = weightd::Checkpoint::Open(dir);
    std::filesystem::remove_all(dir);  // headers are parsed: the plan needs no file contents
    if (!c.ok()) {
      std::fprintf(stderr, "%s\n", std::string(c.status().message()).c_str());
      std::abort();
    }
    return new weightd::Checkpoint(*std::move(c));
  }();
  return *ckpt;
}

void BM_BuildPlanLlama70B_TP8(benchmark::State& state) {
  const weightd::Checkpoint& c = Llama70B();
  weightd::PlanOptions o;
  o.tp = 8;
  size_t pieces = 0;
  for (auto _ : state) {
    auto plan = weightd::BuildPlan(c, o);
    if (!plan.ok()) state.SkipWithError(std::string(plan.status().message()).c_str());
    pieces = plan->ranks[0].pieces.size();
    benchmark::DoNotOptimize(plan);
  }
  state.counters["tensors"] = static_cast<double>(c.tensors().size());
  state.counters["pieces_per_rank"] = static_cast<double>(pieces);
}
BENCHMARK(BM_BuildPlanLlama70B_TP8)->Unit(benchmark::kMillisecond);

void BM_PlanToJsonLlama70B_TP8(benchmark::State& state) {
  weightd::PlanOptions o;
  o.tp = 8;
  auto plan = weightd::BuildPlan(Llama70B(), o);
  for (auto _ : state) benchmark::DoNotOptimize(weightd::PlanToJson(*plan));
}
BENCHMARK(BM_PlanToJsonLlama70B_TP8)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
