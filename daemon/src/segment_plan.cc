#include "weightd/segment_plan.h"

#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"
#include "weightd/status_macros.h"

namespace weightd {
namespace {

uint64_t AlignedBytes(uint64_t nbytes) {
  return (nbytes + kTargetAlignment - 1) / kTargetAlignment * kTargetAlignment;
}

}  // namespace

std::optional<uint64_t> LayerOf(absl::string_view name) {
  constexpr absl::string_view kKey = "layers.";
  for (size_t at = name.find(kKey); at != absl::string_view::npos; at = name.find(kKey, at + 1)) {
    if (at != 0 && name[at - 1] != '.') continue;
    size_t p = at + kKey.size();
    uint64_t n = 0;
    const size_t first = p;
    while (p < name.size() && name[p] >= '0' && name[p] <= '9' && p - first < 18) {
      n = n * 10 + static_cast<uint64_t>(name[p] - '0');
      ++p;
    }
    if (p > first && p < name.size() && name[p] == '.') return n;
  }
  return std::nullopt;
}

SegmentAssignment ChooseSegments(const Plan& plan, uint64_t segment_bytes) {
  SegmentAssignment out;
  out.reserve(plan.ranks.size());
  for (const RankPlan& rp : plan.ranks) {
    std::vector<uint32_t>& seg = out.emplace_back(rp.targets.size(), 0);
    if (segment_bytes == 0) continue;
    // Layer -> its targets and their aligned bytes, in layer order.
    std::map<uint64_t, std::pair<std::vector<uint32_t>, uint64_t>> layers;
    bool rest = false;
    for (uint32_t t = 0; t < rp.targets.size(); ++t) {
      const std::optional<uint64_t> layer = LayerOf(rp.targets[t].name);
      if (!layer) {
        rest = true;
        continue;
      }
      auto& [targets, bytes] = layers[*layer];
      targets.push_back(t);
      bytes += AlignedBytes(rp.targets[t].nbytes);
    }
    uint32_t current = rest ? 1 : 0;  // segment 0 is the rest, when there is one
    uint64_t filled = 0;
    bool open = false;  // `current` holds a layer already
    for (const auto& [layer, entry] : layers) {
      const auto& [targets, bytes] = entry;
      if (open && filled + bytes > segment_bytes) {
        ++current;
        filled = 0;
      }
      for (uint32_t t : targets) seg[t] = current;
      filled += bytes;
      open = true;
    }
  }
  return out;
}

absl::StatusOr<SegmentedPlan> SplitPlan(const Plan& plan, const SegmentAssignment& assignment) {
  if (assignment.size() != plan.ranks.size()) {
    return absl::InvalidArgumentError(absl::StrCat("segments are given for ", assignment.size(),
                                                   " ranks; the plan has ", plan.ranks.size()));
  }
  SegmentedPlan out;
  out.plan.checkpoint = plan.checkpoint;
  out.plan.recipe = plan.recipe;
  out.plan.architecture = plan.architecture;
  out.plan.tp = plan.tp;
  out.plan.expert_parallel = plan.expert_parallel;
  out.plan.files = plan.files;
  out.plan.sources = plan.sources;
  out.plan.checkpoint_bytes = plan.checkpoint_bytes;
  out.plan.read_bytes = plan.read_bytes;
  out.segments_of.resize(plan.ranks.size());
  out.where.resize(plan.ranks.size());
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    const RankPlan& rp = plan.ranks[r];
    const std::vector<uint32_t>& seg = assignment[r];
    if (seg.size() != rp.targets.size()) {
      return absl::InvalidArgumentError(absl::StrCat("rank ", rp.rank, ": segments are given for ",
                                                     seg.size(), " targets; the plan has ",
                                                     rp.targets.size()));
    }
    const uint32_t count = seg.empty() ? 1 : *std::max_element(seg.begin(), seg.end()) + 1;
    std::vector<bool> used(count, seg.empty());
    for (uint32_t s : seg) used[s] = true;
    if (std::find(used.begin(), used.end(), false) != used.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("rank ", rp.rank, ": segment numbers 0..", count - 1, " leave a gap"));
    }
    const size_t first = out.plan.ranks.size();
    for (uint32_t s = 0; s < count; ++s) {
      RankPlan sp;
      sp.rank = rp.rank;
      out.plan.ranks.push_back(std::move(sp));
      out.rank_of.push_back(r);
      out.segment_in_rank.push_back(s);
      out.input_target.emplace_back();
      out.segments_of[r].push_back(first + s);
    }
    auto target_of = [&](uint32_t t, absl::string_view what) -> absl::Status {
      if (t >= rp.targets.size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "rank ", rp.rank, ": a ", what, " names target ", t, " of ", rp.targets.size()));
      }
      return absl::OkStatus();
    };
    out.where[r].resize(rp.targets.size());
    for (uint32_t t = 0; t < rp.targets.size(); ++t) {
      const size_t s = first + seg[t];
      RankPlan& sp = out.plan.ranks[s];
      PlanTarget target = rp.targets[t];
      target.offset = sp.arena_bytes;
      sp.arena_bytes += AlignedBytes(target.nbytes);
      out.where[r][t] = {s, static_cast<uint32_t>(sp.targets.size())};
      out.input_target[s].push_back(t);
      sp.targets.push_back(std::move(target));
    }
    // Each piece, zero-fill and transform goes to its target's segment, renumbered there.
    auto to_segments = [&](const auto& items, auto member, absl::string_view what) {
      for (const auto& item : items) {
        WD_RETURN_IF_ERROR(target_of(item.target, what));
        const auto [s, local] = out.where[r][item.target];
        auto moved = item;
        moved.target = local;
        (out.plan.ranks[s].*member).push_back(std::move(moved));
      }
      return absl::OkStatus();
    };
    WD_RETURN_IF_ERROR(to_segments(rp.pieces, &RankPlan::pieces, "piece"));
    WD_RETURN_IF_ERROR(to_segments(rp.zero_fills, &RankPlan::zero_fills, "zero-fill"));
    WD_RETURN_IF_ERROR(to_segments(rp.transforms, &RankPlan::transforms, "transform"));
  }
  return out;
}

}  // namespace weightd
