// UpdatePlan: which parts of a loaded model new tensors rewrite, as a Plan the executors run.
//
// An update (docs/PROTOCOL.md "Generations") gives some of a checkpoint's tensors new values.
// The model's own plan (the one its load ran) says where each checkpoint tensor goes: this turns
// it into a plan over the update's files holding only the pieces those tensors feed, for the
// ranks they touch, and lists for each touched rank the targets that must first be copied from
// the current generation because the update does not cover them completely (a fused qkv_proj of
// which only q is new, or a target no new tensor feeds).
//
//   WD_ASSIGN_OR_RETURN(Checkpoint u, Checkpoint::Open(dir, roots));
//   WD_ASSIGN_OR_RETURN(UpdatePlan up, BuildUpdatePlan(model_plan, skipped, u, "llama"));
//   copy up.copy[i] targets from the current arena of rank up.rank_index[i], then
//   ExecutePlanHost(up.plan, new_arenas, ...)
//
// Pure function over plain data; thread-safe.
#ifndef WEIGHTD_UPDATE_PLAN_H_
#define WEIGHTD_UPDATE_PLAN_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/checkpoint.h"
#include "weightd/plan.h"

namespace weightd {

struct UpdatePlan {
  // files: the update's; sources: the model plan's sources the update holds, located in the
  // update's files; ranks: the touched ranks only (in model order), each with all of its
  // targets (same offsets) and only the pieces that read a new tensor; no zero-fills (a new
  // arena is zero-filled and copies carry the rest).
  Plan plan;
  // Per plan.ranks[i]: its index in the model plan's ranks.
  std::vector<size_t> rank_index;
  // Per plan.ranks[i]: the targets (indices) that are copied from the current generation
  // before the pieces run, because new tensors do not cover every byte of them.
  std::vector<std::vector<uint32_t>> copy;
  // Per plan.ranks[i]: the targets that some new tensor feeds (rewritten, fully or partly).
  std::vector<std::vector<uint32_t>> rewritten;
  size_t tensors_used = 0;     // new tensors the plan reads
  size_t tensors_ignored = 0;  // new tensors the checkpoint has but the recipe skips
};

// `model_plan`: the plan the model's load ran (its ranks only). `skipped`: names of the model's
// checkpoint tensors that its plan does not read (sorted). Errors (INVALID_ARGUMENT, naming the
// model):
//   - a tensor the checkpoint does not have, naming it and the nearest names it has;
//   - a tensor whose dtype or shape differs from the checkpoint's, naming both;
//   - an update holding no tensor at all.
absl::StatusOr<UpdatePlan> BuildUpdatePlan(const Plan& model_plan,
                                           const std::vector<std::string>& skipped,
                                           const Checkpoint& update, absl::string_view model);

// Up to `n` of `candidates` closest to `name` (edit distance, ties in candidate order), for
// "did you mean" messages.
std::vector<std::string> NearestNames(absl::string_view name,
                                      const std::vector<std::string>& candidates, size_t n);

}  // namespace weightd

#endif  // WEIGHTD_UPDATE_PLAN_H_
