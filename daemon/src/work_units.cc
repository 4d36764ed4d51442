#include "weightd/detail/work_units.h"

#include <algorithm>
#include <numeric>

#include "weightd/crc32c.h"
#include "weightd/status_macros.h"

namespace weightd::detail {

bool IsVerbatim(const Plan& plan, const RankPlan& rp, const PlanPiece& p) {
  return plan.sources[p.source].dtype == rp.targets[p.target].dtype &&
         p.src_start == Index3{0, 0, 0} && p.dst_start == Index3{0, 0, 0} &&
         p.extent == p.src_shape && p.extent == p.dst_shape;
}

absl::StatusOr<WorkPlan> BuildWorkPlan(const Plan& plan, std::span<Arena* const> rank_arenas,
                                       uint64_t chunk) {
  WorkPlan w;
  w.by_source.resize(plan.sources.size());
  w.verbatim.assign(plan.sources.size(), -1);
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    const RankPlan& rp = plan.ranks[r];
    for (const PlanPiece& p : rp.pieces) {
      WD_RETURN_IF_ERROR(CheckPlanPiece(plan, rp, p, rank_arenas[r]->size()));
      const uint64_t row_bytes =
          static_cast<uint64_t>(p.src_shape[2]) * DTypeSize(plan.sources[p.source].dtype);
      if (w.verbatim[p.source] < 0 && IsVerbatim(plan, rp, p)) {
        w.verbatim[p.source] = static_cast<int>(w.by_source[p.source].size());
      }
      w.any_cast = w.any_cast || plan.sources[p.source].dtype != rp.targets[p.target].dtype;
      w.by_source[p.source].push_back({r, &p, std::max<uint64_t>(row_bytes, 1)});
    }
  }
  w.first_unit.assign(plan.sources.size(), 0);
  for (uint32_t s = 0; s < plan.sources.size(); ++s) {
    w.first_unit[s] = w.units.size();
    if (w.by_source[s].empty()) continue;
    const uint64_t nbytes = plan.sources[s].nbytes;
    w.total_bytes += nbytes;
    uint64_t g = 1;
    for (const PieceRef& pr : w.by_source[s]) g = std::lcm(g, pr.row_bytes);
    const uint64_t step = g >= chunk ? g : chunk - chunk % g;
    if (nbytes == 0) {
      w.units.push_back({s, 0, 0});
      continue;
    }
    for (uint64_t b = 0; b < nbytes; b += step) {
      w.units.push_back({s, b, std::min(nbytes, b + step)});
      w.largest_unit = std::max(w.largest_unit, w.units.back().end - b);
    }
  }
  return w;
}

void AssignVerbatimChecksums(const Plan& plan, const WorkPlan& work,
                             const std::vector<uint32_t>& unit_crc, TargetChecksums* checksums) {
  checksums->crc.assign(plan.ranks.size(), {});
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    checksums->crc[r].assign(plan.ranks[r].targets.size(), -1);
  }
  for (uint32_t s = 0; s < plan.sources.size(); ++s) {
    if (work.verbatim[s] < 0) continue;
    uint32_t crc = 0;
    for (size_t i = work.first_unit[s]; i < work.units.size() && work.units[i].source == s; ++i) {
      crc = Crc32cCombine(crc, unit_crc[i], work.units[i].end - work.units[i].begin);
    }
    // Every verbatim piece of this source holds the same bytes.
    for (const PieceRef& pr : work.by_source[s]) {
      if (IsVerbatim(plan, plan.ranks[pr.rank], *pr.piece)) {
        checksums->crc[pr.rank][pr.piece->target] = crc;
      }
    }
  }
}

}  // namespace weightd::detail
