// SegmentPlan: a rank's memory as several arenas ("segments"), so that an update replaces only
// the arenas holding targets it rewrites (docs/PROTOCOL.md "Generations", "Segments").
//
// A segment is a contiguous run of whole decoder layers' targets (the targets whose name holds
// `layers.N.`), grouped in layer order until a size target is reached, or the rest of the rank's
// targets (embeddings, final norm, lm_head), which form one segment of their own. Splitting is a
// pure Plan -> Plan transform: each segment becomes a RankPlan of its own (same `rank`) with
// segment-relative offsets and its pieces, zero-fills and transforms re-indexed, so the
// executors, which treat every RankPlan as one arena, run it unchanged.
//
//   SegmentAssignment a = ChooseSegments(plan, 256 << 20);
//   WD_ASSIGN_OR_RETURN(SegmentedPlan sp, SplitPlan(plan, a));
//   // allocate one arena per sp.plan.ranks[s]; ExecutePlanHost(sp.plan, arenas, ...);
//   // the manifest of model rank r lists sp.segments_of[r] as its arenas 0, 1, ...
//
// Thread-safety: pure functions over plain data.
#ifndef WEIGHTD_SEGMENT_PLAN_H_
#define WEIGHTD_SEGMENT_PLAN_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/plan.h"

namespace weightd {

// Per rank of a plan (same order), per target of the rank: the segment (0, 1, ... within the
// rank) that holds it. A rank's segments are numbered in the order its arenas appear in its
// manifest; every number below the rank's largest is used.
using SegmentAssignment = std::vector<std::vector<uint32_t>>;

// The decoder layer `name` belongs to: N for the first "layers.N." component (at the start of
// the name or after a '.'), nullopt for the rest (embeddings, norms, lm_head).
std::optional<uint64_t> LayerOf(absl::string_view name);

// Deterministic segments of every rank of `plan`: segment 0 holds the targets of no layer (when
// there are any); then layers in increasing order, consecutive layers sharing a segment until
// adding the next one would take the segment's aligned bytes past `segment_bytes` (a layer
// larger than that has a segment of its own). `segment_bytes` 0 puts every target of a rank in
// segment 0 (one arena per rank, the layout of daemons before segments). A rank without targets
// has one empty segment.
SegmentAssignment ChooseSegments(const Plan& plan, uint64_t segment_bytes);

struct SegmentedPlan {
  // The input plan with ranks[s] = segment s: the input rank's targets of that segment in their
  // input order, laid out from offset 0 with kTargetAlignment, the pieces / zero-fills /
  // transforms of those targets (target indices re-numbered, order kept). files, sources and
  // read_bytes are the input's.
  Plan plan;
  // Per segment: the index of its rank in the input plan, and its number within that rank.
  std::vector<size_t> rank_of;
  std::vector<uint32_t> segment_in_rank;
  // Per segment, per target: the target's index in its input rank.
  std::vector<std::vector<uint32_t>> input_target;
  // Per input rank: its segments (indices into plan.ranks), in segment-number order.
  std::vector<std::vector<size_t>> segments_of;
  // Per input rank, per input target: the segment (index into plan.ranks) and the target's index
  // there.
  std::vector<std::vector<std::pair<size_t, uint32_t>>> where;
};

// INVALID_ARGUMENT naming the rank when `assignment` does not match the plan (a rank or target
// count differs, or a rank's segment numbers leave a gap).
absl::StatusOr<SegmentedPlan> SplitPlan(const Plan& plan, const SegmentAssignment& assignment);

}  // namespace weightd

#endif  // WEIGHTD_SEGMENT_PLAN_H_
