// weightctl plan CKPT --tp T [...]: prints the plan (targets, sources, bytes) without reading
// tensor data.
#include <iostream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "weightd/args.h"
#include "weightctl/commands.h"
#include "weightctl/plan_args.h"
#include "weightd/checkpoint.h"
#include "weightd/dtype.h"
#include "weightd/plan.h"

namespace weightd::cli {

void AddPlanArgs(ArgParser& p, PlanArgs* a) {
  p.Positional("CKPT", &a->checkpoint, "checkpoint directory or .safetensors file");
  p.Option("--tp", "T", &a->tp, "tensor-parallel size (required)");
  p.Option("--rank", "R", &a->rank, "only this rank (default: all ranks)");
  p.Option("--dtype", "DTYPE", &a->dtype,
           "auto (the checkpoint's), bf16, fp16 or fp32: casts floating-point tensors");
  p.Flag("--expert-parallel", &a->expert_parallel,
         "split MoE experts across ranks instead of slicing every expert");
  p.Repeated("--skip", "SUBSTR", &a->skip,
             "skip checkpoint tensors whose name contains SUBSTR (repeatable)");
  p.Option("--recipe", "FILE", &a->recipe,
           "JSON recipe that extends, overrides or replaces the built-in (docs/RECIPES.md)");
}

absl::StatusOr<PlanOptions> ToPlanOptions(const PlanArgs& a) {
  PlanOptions o;
  if (a.tp.empty()) return absl::InvalidArgumentError("--tp is required (e.g. --tp 4)");
  absl::StatusOr<int64_t> tp = ParseInt("--tp", a.tp);
  if (!tp.ok()) return tp.status();
  if (*tp < 1 || *tp > 4096) return absl::InvalidArgumentError("--tp must be in [1, 4096]");
  o.tp = static_cast<int>(*tp);
  if (!a.rank.empty()) {
    absl::StatusOr<int64_t> r = ParseInt("--rank", a.rank);
    if (!r.ok()) return r.status();
    if (*r >= o.tp) {
      return absl::InvalidArgumentError(absl::StrCat("--rank ", *r, " must be below --tp ", o.tp));
    }
    o.rank = static_cast<int>(*r);
  }
  if (a.dtype != "auto") {
    std::optional<DType> d = ParseDTypeAlias(a.dtype);
    if (!d || !(*d == DType::kBF16 || *d == DType::kF16 || *d == DType::kF32)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--dtype '", a.dtype, "': expected auto, bf16, fp16 or fp32"));
    }
    o.dtype = *d;
  }
  o.expert_parallel = a.expert_parallel;
  o.skip_substrings = a.skip;
  if (!a.recipe.empty()) o.recipe_file = a.recipe;
  return o;
}

namespace {

std::string Range(int64_t start, int64_t n, int64_t full) {
  if (start == 0 && n == full) return ":";
  return absl::StrCat(start, ":", start + n);
}

// "name[rows 0:128, cols :]" in the source tensor's own terms.
std::string DescribePiece(const Plan& plan, const PlanPiece& p) {
  const PlanSource& s = plan.sources[p.source];
  std::string box;
  if (p.src_shape[0] > 1)
    absl::StrAppend(&box, Range(p.src_start[0], p.extent[0], p.src_shape[0]), ", ");
  if (p.src_shape[1] > 1 || s.shape.size() >= 2) {
    absl::StrAppend(&box, Range(p.src_start[1], p.extent[1], p.src_shape[1]), ", ");
  }
  absl::StrAppend(&box, Range(p.src_start[2], p.extent[2], p.src_shape[2]));
  return absl::StrCat(s.name, "[", box, "]");
}

void PrintHuman(const Plan& plan, const PlanOptions& o) {
  std::cout << absl::StrFormat("plan: %s, recipe '%s', tp %d%s, dtype %s\n", plan.checkpoint,
                               plan.recipe, plan.tp,
                               plan.expert_parallel ? " (expert parallel)" : "",
                               o.dtype ? std::string(DTypeName(*o.dtype)) : "auto");
  for (const RankPlan& r : plan.ranks) {
    std::cout << absl::StrFormat("\nrank %d: %d targets, %d pieces, arena %s (%d bytes)\n", r.rank,
                                 r.targets.size(), r.pieces.size(), HumanBytes(r.arena_bytes),
                                 r.arena_bytes);
    std::vector<std::vector<const PlanPiece*>> by_target(r.targets.size());
    for (const PlanPiece& p : r.pieces) by_target[p.target].push_back(&p);
    std::vector<uint64_t> zeros(r.targets.size());
    for (const PlanZeroFill& z : r.zero_fills) zeros[z.target] += z.nbytes;
    for (size_t i = 0; i < r.targets.size(); ++i) {
      const PlanTarget& t = r.targets[i];
      std::vector<std::string> srcs;
      for (const PlanPiece* p : by_target[i]) srcs.push_back(DescribePiece(plan, *p));
      std::cout << absl::StrFormat("  %-58s %-5s [%s] %s\n      <- %s%s\n", t.name,
                                   DTypeName(t.dtype), absl::StrJoin(t.shape, ", "),
                                   ParallelStyleName(t.style), absl::StrJoin(srcs, " + "),
                                   zeros[i] ? absl::StrCat(" + ", zeros[i], " zero bytes") : "");
    }
  }
  std::cout << "\nfiles:\n";
  for (const PlanFile& f : plan.files) {
    std::cout << absl::StrFormat("  %-60s reads %s of %s\n", f.path, HumanBytes(f.read_bytes),
                                 HumanBytes(f.file_size));
  }
  uint64_t arena_total = 0;
  for (const RankPlan& r : plan.ranks) arena_total += r.arena_bytes;
  std::cout << absl::StrFormat(
      "\ntotal: reads %s of the checkpoint's %s tensor bytes (%.1f%%), each byte once for all "
      "%d rank(s); writes %s of arenas\n",
      HumanBytes(plan.read_bytes), HumanBytes(plan.checkpoint_bytes),
      plan.checkpoint_bytes ? 100.0 * plan.read_bytes / plan.checkpoint_bytes : 0.0,
      plan.ranks.size(), HumanBytes(arena_total));
}

}  // namespace

int PlanMain(int argc, char** argv) {
  PlanArgs a;
  bool json = false;
  ArgParser p("weightctl plan", "Prints how a checkpoint maps to per-rank engine parameters.");
  AddPlanArgs(p, &a);
  p.Flag("--json", &json, "print the plan as JSON");
  p.Epilog("example: weightctl plan /models/Llama-3-8B --tp 4 --rank 1");
  if (absl::Status s = p.Parse(argc, argv); !s.ok()) {
    std::cerr << "weightctl plan: " << s.message() << "\n";
    return 2;
  }
  if (p.help_requested()) {
    std::cout << p.Help();
    return 0;
  }
  absl::StatusOr<PlanOptions> o = ToPlanOptions(a);
  if (!o.ok()) {
    std::cerr << "weightctl plan: " << o.status().message() << "\n";
    return 2;
  }
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(a.checkpoint);
  if (!ckpt.ok()) {
    std::cerr << "weightctl plan: " << ckpt.status().message() << "\n";
    return 1;
  }
  absl::StatusOr<Plan> plan = BuildPlan(*ckpt, *o);
  if (!plan.ok()) {
    std::cerr << "weightctl plan: " << plan.status().message() << "\n";
    return 1;
  }
  if (json) {
    absl::StatusOr<std::string> text = PlanToJson(*plan);
    if (!text.ok()) {
      std::cerr << "weightctl plan: " << text.status().message() << "\n";
      return 1;
    }
    std::cout << *text;
  } else {
    PrintHuman(*plan, *o);
  }
  return 0;
}

}  // namespace weightd::cli
