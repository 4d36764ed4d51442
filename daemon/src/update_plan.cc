#include "weightd/update_plan.h"

#include <algorithm>
#include <numeric>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace weightd {
namespace {

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  std::iota(row.begin(), row.end(), size_t{0});
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

}  // namespace

std::vector<std::string> NearestNames(absl::string_view name,
                                      const std::vector<std::string>& candidates, size_t n) {
  std::vector<std::pair<size_t, size_t>> scored;  // (distance, index)
  scored.reserve(candidates.size());
  for (size_t i = 0; i < candidates.size(); ++i) {
    scored.emplace_back(EditDistance(name, candidates[i]), i);
  }
  std::stable_sort(scored.begin(), scored.end(),
                   [](const auto& x, const auto& y) { return x.first < y.first; });
  std::vector<std::string> out;
  for (size_t i = 0; i < scored.size() && i < n; ++i) out.push_back(candidates[scored[i].second]);
  return out;
}

absl::StatusOr<UpdatePlan> BuildUpdatePlan(const Plan& model_plan,
                                           const std::vector<std::string>& skipped,
                                           const Checkpoint& update, absl::string_view model) {
  auto error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("update of model '", model, "': ", what));
  };
  if (update.tensors().empty()) return error("the update holds no tensor");
  absl::flat_hash_map<absl::string_view, uint32_t> by_name;
  for (uint32_t i = 0; i < model_plan.sources.size(); ++i) {
    by_name.emplace(model_plan.sources[i].name, i);
  }
  // Model source index -> the update's tensor that replaces it.
  std::vector<const CheckpointTensor*> replacement(model_plan.sources.size(), nullptr);
  UpdatePlan up;
  for (const CheckpointTensor& t : update.tensors()) {
    auto it = by_name.find(t.name);
    if (it == by_name.end()) {
      if (std::binary_search(skipped.begin(), skipped.end(), t.name)) {
        ++up.tensors_ignored;  // the recipe skips it (rotary_emb.inv_freq, ...)
        continue;
      }
      std::vector<std::string> names;
      names.reserve(model_plan.sources.size() + skipped.size());
      for (const PlanSource& s : model_plan.sources) names.push_back(s.name);
      names.insert(names.end(), skipped.begin(), skipped.end());
      const std::vector<std::string> near = NearestNames(t.name, names, 3);
      return error(absl::StrCat("the checkpoint has no tensor named '", t.name, "'",
                                near.empty() ? std::string()
                                             : absl::StrCat("; nearest names it has: '",
                                                            absl::StrJoin(near, "', '"), "'")));
    }
    const PlanSource& s = model_plan.sources[it->second];
    if (s.dtype != t.dtype || s.shape != t.shape) {
      return error(absl::StrCat("tensor '", t.name, "' is ", DTypeName(t.dtype), " ",
                                ShapeText(t.shape), " in the update but ", DTypeName(s.dtype), " ",
                                ShapeText(s.shape), " in the loaded checkpoint"));
    }
    replacement[it->second] = &t;
    ++up.tensors_used;
  }
  if (up.tensors_used == 0) {
    return error(absl::StrCat("none of its ", update.tensors().size(),
                              " tensors is one the model reads (the recipe skips them all)"));
  }

  // Sources in the update's (file, offset) order, as executors stream them.
  std::vector<uint32_t> used;
  for (uint32_t i = 0; i < replacement.size(); ++i) {
    if (replacement[i] != nullptr) used.push_back(i);
  }
  std::sort(used.begin(), used.end(), [&](uint32_t a, uint32_t b) {
    const CheckpointTensor& x = *replacement[a];
    const CheckpointTensor& y = *replacement[b];
    return std::tie(x.file, x.offset) < std::tie(y.file, y.offset);
  });
  constexpr uint32_t kUnused = ~0u;
  std::vector<uint32_t> new_index(model_plan.sources.size(), kUnused);
  Plan& plan = up.plan;
  plan.checkpoint = update.dir();
  plan.recipe = model_plan.recipe;
  plan.architecture = model_plan.architecture;
  plan.tp = model_plan.tp;
  plan.expert_parallel = model_plan.expert_parallel;
  plan.checkpoint_bytes = update.total_bytes();
  for (const CheckpointFile& f : update.files()) {
    plan.files.push_back(
        PlanFile{.path = f.path, .file_size = f.file_size, .read_bytes = 0, .identity = f.identity});
  }
  for (uint32_t old : used) {
    const CheckpointTensor& t = *replacement[old];
    new_index[old] = static_cast<uint32_t>(plan.sources.size());
    PlanSource s = model_plan.sources[old];
    s.file = t.file;
    s.offset = t.offset;
    s.nbytes = t.nbytes;
    plan.files[t.file].read_bytes += t.nbytes;
    plan.read_bytes += t.nbytes;
    plan.sources.push_back(std::move(s));
  }

  for (size_t ri = 0; ri < model_plan.ranks.size(); ++ri) {
    const RankPlan& mr = model_plan.ranks[ri];
    RankPlan rp;
    rp.rank = mr.rank;
    rp.targets = mr.targets;
    rp.transforms = mr.transforms;
    rp.arena_bytes = mr.arena_bytes;
    // Bytes of each target that the update (its pieces, and the target's zero-fills, which a
    // fresh arena already satisfies) will have written.
    std::vector<uint64_t> covered(mr.targets.size(), 0);
    std::vector<bool> fed(mr.targets.size(), false);
    for (const PlanPiece& p : mr.pieces) {
      if (p.source >= new_index.size() || new_index[p.source] == kUnused) continue;
      PlanPiece q = p;
      q.source = new_index[p.source];
      rp.pieces.push_back(q);
      if (p.target < mr.targets.size()) {
        fed[p.target] = true;
        covered[p.target] += static_cast<uint64_t>(p.extent[0] * p.extent[1] * p.extent[2]) *
                             DTypeSize(mr.targets[p.target].dtype);
      }
    }
    if (rp.pieces.empty()) continue;  // this rank keeps its arena
    for (const PlanZeroFill& z : mr.zero_fills) {
      if (z.target < covered.size()) covered[z.target] += z.nbytes;
    }
    std::stable_sort(rp.pieces.begin(), rp.pieces.end(),
                     [](const PlanPiece& a, const PlanPiece& b) { return a.source < b.source; });
    std::vector<uint32_t> copy, rewritten;
    for (uint32_t t = 0; t < mr.targets.size(); ++t) {
      if (fed[t]) rewritten.push_back(t);
      if (!fed[t] || covered[t] < mr.targets[t].nbytes) copy.push_back(t);
    }
    up.rank_index.push_back(ri);
    up.copy.push_back(std::move(copy));
    up.rewritten.push_back(std::move(rewritten));
    plan.ranks.push_back(std::move(rp));
  }
  return up;
}

}  // namespace weightd
