#include "weightd/detail/work_units.h"

#include <fcntl.h>

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "weightd/crc32c.h"
#include "weightd/detail/page_cache.h"
#include "weightd/file_util.h"
#include "weightd/log.h"
#include "weightd/status_macros.h"

namespace weightd::detail {

bool IsVerbatim(const Plan& plan, const RankPlan& rp, const PlanPiece& p) {
  return plan.sources[p.source].dtype == rp.targets[p.target].dtype &&
         p.src_start == Index3{0, 0, 0} && p.dst_start == Index3{0, 0, 0} &&
         p.extent == p.src_shape && p.extent == p.dst_shape;
}

absl::StatusOr<WorkPlan> BuildWorkPlan(const Plan& plan, std::span<Arena* const> rank_arenas,
                                       uint64_t chunk) {
  std::vector<uint64_t> sizes;
  for (const Arena* a : rank_arenas) sizes.push_back(a->size());
  return BuildWorkPlan(plan, sizes, chunk);
}

absl::StatusOr<WorkPlan> BuildWorkPlan(const Plan& plan, std::span<const uint64_t> arena_bytes,
                                       uint64_t chunk) {
  if (arena_bytes.size() != plan.ranks.size()) {
    return absl::InternalError(absl::StrCat("executor got ", arena_bytes.size(),
                                            " destinations for ", plan.ranks.size(), " ranks"));
  }
  WorkPlan w;
  w.by_source.resize(plan.sources.size());
  w.verbatim.assign(plan.sources.size(), -1);
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    const RankPlan& rp = plan.ranks[r];
    for (const PlanPiece& p : rp.pieces) {
      WD_RETURN_IF_ERROR(CheckPlanPiece(plan, rp, p, arena_bytes[r]));
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
  w.row_align.assign(plan.sources.size(), 1);
  for (uint32_t s = 0; s < plan.sources.size(); ++s) {
    w.first_unit[s] = w.units.size();
    if (w.by_source[s].empty()) continue;
    const uint64_t nbytes = plan.sources[s].nbytes;
    w.total_bytes += nbytes;
    uint64_t g = 1;
    for (const PieceRef& pr : w.by_source[s]) g = std::lcm(g, pr.row_bytes);
    w.row_align[s] = g;
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

UnitQueue::UnitQueue(const WorkPlan& work, int workers) {
  const size_t n = static_cast<size_t>(std::max(1, workers));
  lanes_.resize(n);
  uint64_t total = 0;
  for (const WorkUnit& u : work.units) total += u.end - u.begin;
  // Lane k starts at the first unit at or after byte k/n of the whole.
  size_t lane = 0;
  uint64_t before = 0;
  for (size_t i = 0; i < work.units.size(); ++i) {
    while (lane + 1 < n && before >= total / n * (lane + 1)) {
      lanes_[lane].end = i;
      lanes_[++lane].next = i;
    }
    before += work.units[i].end - work.units[i].begin;
  }
  lanes_[lane].end = work.units.size();
  for (size_t k = lane + 1; k < n; ++k) lanes_[k] = {work.units.size(), work.units.size()};
}

std::optional<size_t> UnitQueue::Take(int worker, std::optional<size_t>* ahead) {
  absl::MutexLock l(&mu_);
  Lane& own = lanes_[static_cast<size_t>(worker) % lanes_.size()];
  if (own.next >= own.end) {
    Lane* fullest = nullptr;
    for (Lane& v : lanes_) {
      if (v.end > v.next && (fullest == nullptr || v.end - v.next > fullest->end - fullest->next)) {
        fullest = &v;
      }
    }
    if (fullest == nullptr) {
      *ahead = std::nullopt;
      return std::nullopt;
    }
    const size_t mid = fullest->next + (fullest->end - fullest->next) / 2;
    own = {mid, fullest->end};
    fullest->end = mid;
  }
  const size_t i = own.next++;
  *ahead = own.next < own.end ? std::optional<size_t>(own.next) : std::nullopt;
  return i;
}

absl::StatusOr<PlanFiles> PlanFiles::Open(const Plan& plan, IoMode mode) {
  PlanFiles f;
  f.mode_ = mode;
  for (const PlanFile& pf : plan.files) {
    WD_ASSIGN_OR_RETURN(std::unique_ptr<ReadFile> rf,
                        ReadFile::Open(pf.path, mode != IoMode::kPread));
    if (pf.identity)
      WD_RETURN_IF_ERROR(weightd::CheckUnchanged(pf.path, *pf.identity, rf->identity()));
    // Units of a file are read in order: a larger readahead window for cold files.
    (void)::posix_fadvise(rf->buffered_fd(), 0, 0, POSIX_FADV_SEQUENTIAL);
    f.files_.push_back(std::move(rf));
  }
  if (mode != IoMode::kAuto) return f;
  f.maps_.resize(plan.files.size());
  for (size_t i = 0; i < plan.files.size(); ++i) {
    absl::StatusOr<MappedFile> m = MappedFile::Open(plan.files[i].path);
    if (m.ok()) f.maps_[i] = std::move(*m);
  }
  return f;
}

void PlanFiles::WillNeed(uint32_t file, uint64_t offset, uint64_t length) const {
  (void)::posix_fadvise(fd(file), static_cast<off_t>(offset), static_cast<off_t>(length),
                        POSIX_FADV_WILLNEED);
}

absl::Status PlanFiles::CheckUnchanged() const {
  for (const std::unique_ptr<ReadFile>& f : files_) {
    WD_ASSIGN_OR_RETURN(FileIdentity now, IdentityOfFd(f->buffered_fd(), f->path()));
    WD_RETURN_IF_ERROR(weightd::CheckUnchanged(f->path(), f->identity(), now));
  }
  return absl::OkStatus();
}

bool PlanFiles::WantUring(uint32_t file, uint64_t offset, uint64_t length,
                          uint64_t capacity) const {
  if (mode_ == IoMode::kPread || length == 0 ||
      UringReader::AlignedSpan(offset, length) > capacity) {
    return false;
  }
  if (mode_ == IoMode::kUring) return true;
  const MappedFile& m = maps_[file];
  if (offset + length > m.size()) return false;
  absl::StatusOr<double> resident = ResidentFraction(m.bytes().data() + offset, length);
  return resident.ok() && *resident < kCachedThreshold;
}

UringReader* LazyUringReader::get() {
  if (reader_ != nullptr || failed_) return reader_.get();
  absl::StatusOr<std::unique_ptr<UringReader>> r =
      UringReader::Create({.queue_depth = queue_depth_});
  if (r.ok()) {
    reader_ = std::move(*r);
  } else {
    failed_ = true;
    if (!warned_->exchange(true)) {
      LogWarning("io_uring unavailable, reading with pread: %s", r.status().ToString());
    }
  }
  return reader_.get();
}

absl::StatusOr<std::span<const std::byte>> ReadInto(const PlanFiles& files, UringReader* uring,
                                                    uint32_t file, uint64_t offset, uint64_t length,
                                                    std::byte* buffer, uint64_t capacity,
                                                    absl::string_view tensor,
                                                    LoadProgress* progress) {
  if (uring != nullptr) {
    absl::StatusOr<std::span<const std::byte>> got =
        uring->ReadExtent(files.direct(file), offset, length, buffer, capacity);
    if (!got.ok()) return Annotate(got.status(), absl::StrCat("tensor '", tensor, "'"));
    progress->bytes_uring.fetch_add(length, std::memory_order_relaxed);
    return got;
  }
  const std::string label = absl::StrCat(files.path(file), " (tensor '", tensor, "')");
  if (length > capacity) {
    return absl::InternalError(
        absl::StrCat(label, ": ", length, " bytes do not fit a read buffer of ", capacity));
  }
  WD_RETURN_IF_ERROR(PreadExact(files.fd(file), buffer, length, offset, label));
  progress->bytes_pread.fetch_add(length, std::memory_order_relaxed);
  return std::span<const std::byte>(buffer, length);
}

}  // namespace weightd::detail
