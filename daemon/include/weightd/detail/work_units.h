// How a plan becomes read work: pieces grouped by source over all ranks, and each source cut
// into row-aligned units so that every checkpoint byte is read exactly once. Shared by the host
// and CUDA executors, which differ only in where a unit's bytes go.
// Pure functions over a Plan; thread-safe.
#ifndef WEIGHTD_DETAIL_WORK_UNITS_H_
#define WEIGHTD_DETAIL_WORK_UNITS_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "weightd/backend.h"
#include "weightd/executor.h"
#include "weightd/plan.h"

namespace weightd::detail {

struct PieceRef {
  size_t rank;
  const PlanPiece* piece;
  uint64_t row_bytes;  // bytes per row of this piece's source view
};

struct WorkUnit {
  uint32_t source;
  uint64_t begin, end;  // byte range within the source
};

// A piece that copies its whole source, unchanged, onto its whole target: the source's bytes
// are the target's bytes (read straight into the arena; checksummed from the read).
bool IsVerbatim(const Plan& plan, const RankPlan& rp, const PlanPiece& p);

struct WorkPlan {
  std::vector<std::vector<PieceRef>> by_source;  // [source] pieces of every rank that read it
  std::vector<int> verbatim;       // [source] index in by_source of a verbatim piece, or -1
  std::vector<WorkUnit> units;     // sources in plan order (file order), each cut into units
  std::vector<size_t> first_unit;  // [source] index of its first unit
  uint64_t total_bytes = 0;        // bytes of the sources read
  uint64_t largest_unit = 0;       // bytes; a row wider than `chunk` makes a unit larger
  bool any_cast = false;           // some piece changes dtype
};

// Checks every piece (CheckPlanPiece against its rank's arena), groups them and cuts units of
// about `chunk` bytes whose boundaries fall on a row of every piece's view of the source.
absl::StatusOr<WorkPlan> BuildWorkPlan(const Plan& plan, std::span<Arena* const> rank_arenas,
                                       uint64_t chunk);

// Sizes `checksums` to the plan (-1 = unknown) and fills the CRC32C of every verbatim target
// from the per-unit CRCs (`unit_crc[i]` covers units[i]).
void AssignVerbatimChecksums(const Plan& plan, const WorkPlan& work,
                             const std::vector<uint32_t>& unit_crc, TargetChecksums* checksums);

}  // namespace weightd::detail

#endif  // WEIGHTD_DETAIL_WORK_UNITS_H_
