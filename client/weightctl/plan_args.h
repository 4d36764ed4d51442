// The options `weightctl plan` and `weightctl shard` share, and their conversion to PlanOptions.
// Not thread-safe (plain structs filled by ArgParser).
#ifndef WEIGHTD_CLIENT_WEIGHTCTL_PLAN_ARGS_H_
#define WEIGHTD_CLIENT_WEIGHTCTL_PLAN_ARGS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "weightd/args.h"
#include "weightd/plan.h"

namespace weightd::cli {

struct PlanArgs {
  std::string checkpoint;
  std::string tp;
  std::string rank;
  std::string dtype = "auto";
  bool expert_parallel = false;
  std::vector<std::string> skip;
  std::string recipe;
};

// Registers CKPT, --tp, --rank, --dtype, --expert-parallel, --skip and --recipe on `p`.
void AddPlanArgs(ArgParser& p, PlanArgs* a);
// Validates the values; errors name the option.
absl::StatusOr<PlanOptions> ToPlanOptions(const PlanArgs& a);

}  // namespace weightd::cli

#endif  // WEIGHTD_CLIENT_WEIGHTCTL_PLAN_ARGS_H_
